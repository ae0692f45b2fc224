"""python -m runtime.demo: the whole path offline, with the tiny built-in model.

Builds a random checkpoint (Qwen2.5-VL, or Qwen3-VL with ``--family qwen3_vl``) and a sample video (a red
circle moving right), exports them, then answers a question with the chosen method and draws the entropy
trace. A random model's answer is noise; the point is that every stage runs end to end. With a real
checkpoint, use ``python -m export`` and ``python -m runtime`` directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import checks
from models.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.demo", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--out", default="work/demo", help="working folder, relative to the current folder")
    ap.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen2_5_vl",
                    help="model family of the tiny checkpoint (each family has its own folders under --out)")
    ap.add_argument("--method", choices=("base", "vreason", "vreason-lite"), default="vreason",
                    help="decoding method")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda a: demo(a, Path(a.out)), args)


# vision patches the demo export takes: what Video-R1's protocol (runtime.eval's default: 16 frames of at most
# 100352 pixels, 8 temporal patches of 512 patches for 14-pixel patches) asks of any clip, so that
# ``python -m runtime.eval --engine work/demo/tiny-engine --sample`` answers every sample as written (the limit
# derived from the tiny checkpoint's own processor settings, 1024, refuses its videos)
DEMO_VISION_PATCHES = 4096


def _vision_patches(engine: Path) -> int:
    import json

    try:
        return int(json.loads((engine / "manifest.json").read_text())["limits"]["max_vision_patches"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def demo(args, out: Path) -> int:
    from export.exporter import Limits, export_model
    from models.samples import sample_video
    from models.tiny import make_checkpoint
    from runtime.__main__ import main as runtime_main

    checks.check_number("--max-new-tokens", args.max_new_tokens, lo=1, integer=True)
    checks.writable_dir(out, "--out")
    checks.plotting_available("the demo's entropy plot")
    out = out.resolve()
    print(f"working folder: {out}", file=sys.stderr)
    suffix = "" if args.family == "qwen2_5_vl" else f"-{args.family}"
    ckpt = out / f"tiny-checkpoint{suffix}"
    if (ckpt / "config.json").is_file():
        print(f"reusing the tiny checkpoint in {ckpt}", file=sys.stderr)
    else:
        print(f"building the tiny checkpoint in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, family=args.family)
    video = sample_video(out / "circle-right.mp4", "circle", "red", "right", seconds=3)
    engine = out / f"tiny-engine{suffix}"
    if _vision_patches(engine) >= DEMO_VISION_PATCHES:
        print(f"reusing the export in {engine} (delete it to export again)", file=sys.stderr)
    else:
        if (engine / "manifest.json").is_file():
            print(f"exporting again: {engine} takes fewer vision patches than runtime.eval's default protocol asks "
                  "for on the sample set", file=sys.stderr)
        export_model(ckpt, engine, force=True, limits=Limits(max_vision_patches=DEMO_VISION_PATCHES))
    # at the paper's default settings the controller's steps are small on a random tiny model; these are large
    steer = ["--vreason-lr", "0.5", "--vreason-every", "1"] if args.method != "base" else []
    if steer:
        print("V-Reason with lr 0.5 and an update every token, so that the steering is plain to see: at the "
              "defaults (lr 1e-3, every 2) the tiny model's entropy moves by about 0.1 nats", file=sys.stderr)
    question = "Which direction does the red circle move?"
    print(f"question: {question}", file=sys.stderr)
    return runtime_main(["--engine", str(engine), "--video", str(video), "--question", question,
                         "--method", args.method, "--max-new-tokens", str(args.max_new_tokens), "--stream", *steer,
                         "--plot", str(out / f"entropy{suffix}.png")])


if __name__ == "__main__":
    sys.exit(main())
