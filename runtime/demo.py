"""python -m runtime.demo: the whole path offline, with the tiny built-in model.

Builds a random Qwen2.5-VL checkpoint and a sample video (a red circle moving right), exports them,
then answers a question with the chosen method and draws the entropy trace. A random model's answer is
noise; the point is that every stage runs end to end. With a real checkpoint, use
``python -m export`` and ``python -m runtime`` directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="work/demo", help="working directory (default work/demo)")
    ap.add_argument("--method", choices=("base", "vreason", "vreason-lite"), default="vreason")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    return run_cli(lambda a: demo(a, Path(a.out)), args)


def demo(args, out: Path) -> int:
    from export.exporter import export_model
    from models.samples import sample_video
    from models.tiny import make_checkpoint
    from runtime.__main__ import main as runtime_main

    ckpt = out / "tiny-checkpoint"
    if not (ckpt / "config.json").is_file():
        print(f"building the tiny checkpoint in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt)
    video = sample_video(out / "circle-right.mp4", "circle", "red", "right", seconds=3)
    engine = out / "tiny-engine"
    if not (engine / "manifest.json").is_file():
        export_model(ckpt, engine, force=True)
    return runtime_main(["--engine", str(engine), "--video", str(video), "--question",
                         "Which direction does the red circle move?", "--method", args.method,
                         "--max-new-tokens", str(args.max_new_tokens), "--stream",
                         "--plot", str(out / "entropy.png")])


if __name__ == "__main__":
    sys.exit(main())
