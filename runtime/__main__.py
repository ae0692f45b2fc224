"""python -m runtime: answer a question about a video, a folder of frames or an image."""

from __future__ import annotations

import argparse
import json
import sys

from models import checks
from models.errors import UserError, run_cli
from runtime.sampling import add_cli_arguments as add_sampling_arguments
from runtime.sampling import params_from_args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory made by `python -m export`")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (sampled at --fps within the frame budget)")
    src.add_argument("--frames", help="folder of images used, in name order, as the video's frames")
    src.add_argument("--image", help="image file")
    q = ap.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="the question")
    q.add_argument("--question-file", help="UTF-8 text file holding the question")
    ap.add_argument("--backend", choices=("auto", "trt", "ort", "torch"), default="auto",
                    help="auto: trt when tensorrt and a GPU are usable, else ort")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda for trt, cpu otherwise)")
    ap.add_argument("--model", help="torch backend only: run this checkpoint's weights instead of the export's own "
                    "(the parity reference; unquantized exports only). Default: the export folder alone")
    ap.add_argument("--method", choices=("base", "vreason", "vreason-lite"), default="base",
                    help="base decoding, V-Reason, or V-Reason with Lite video-token pruning")
    ap.add_argument("--template", choices=("reasoning", "plain"), default="reasoning",
                    help="reasoning: think, then answer inside <answer></answer>; plain: the question only")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    add_sampling_arguments(ap)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--fps", type=float, default=None,
                    help="rate a --video is sampled at (default: the checkpoint's processor setting, usually 2) "
                    "and the rate --frames are taken at (default 2)")
    ap.add_argument("--max-frames", type=int, default=None,
                    help="sample at most this many video frames (default and ceiling: the export's --max-frames)")
    from models.inputs import add_pixel_arguments
    add_pixel_arguments(ap)
    ap.add_argument("--stream", action="store_true", help="print tokens as they come (not with --json)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the result (exact text)")
    ap.add_argument("--plot", metavar="PNG", help="write the entropy trace of the answer to this PNG file")
    ap.add_argument("--decode", choices=("auto", "static", "dynamic"), default="auto",
                    help="static: fixed-shape decode steps (CUDA graphs on GPU); dynamic: the cache grows per "
                    "token; auto: static on CUDA, dynamic on CPU")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="with static decode on CUDA, run each step eagerly instead of replaying a CUDA graph")
    ap.add_argument("--compile", action="store_true",
                    help="with static decode on CUDA and the torch backend, torch.compile the trunk step "
                    "(slow first request)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip hashing the export's files (presence, sizes and graph I/O are still checked)")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="leave the loaded weights in 4 KB pages (CPU; see runtime.hugepages)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    from controller.config import add_cli_arguments
    add_cli_arguments(ap)
    return ap


def read_question(args) -> str:
    if args.question is not None:
        return args.question
    p = checks.input_file(args.question_file, "--question-file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"question file {p} is not UTF-8 text") from None


def check_args(args) -> None:
    """Every path, device and output precondition, before anything is loaded or computed."""
    if args.stream and args.json:
        raise UserError("--stream and --json do not combine: --json prints one object at the end (use one)")
    checks.input_dir(args.engine, "--engine")
    if args.video:
        checks.input_file(args.video, "--video")
    if args.image:
        checks.input_file(args.image, "--image")
    if args.frames:
        checks.input_dir(args.frames, "--frames")
    if args.model:
        checks.input_dir(args.model, "--model")
    if args.device is not None:
        checks.check_device(args.device)
    if args.plot:
        checks.output_file(args.plot, "--plot", suffix=".png")
        checks.plotting_available()


def run(args) -> int:
    from controller.config import config_from_args
    from models.inputs import pixel_budget
    from runtime.reasoner import Reasoner

    check_args(args)
    question = read_question(args)
    sampling = params_from_args(args)
    controller = config_from_args(args)
    r = Reasoner.load(args.engine, backend=args.backend, device=args.device, model_dir=args.model,
                      verify=not args.no_verify, decode=args.decode,
                      cuda_graphs=False if args.no_cuda_graphs else None, compile=args.compile,
                      hugepages=not args.no_hugepages)
    visual = {"video": args.video} if args.video else {"frames": args.frames} if args.frames \
        else {"image": args.image}
    stream = r.stream(question=question, method=args.method, max_new_tokens=args.max_new_tokens,
                      template=args.template, sampling=sampling, stop=args.stop, controller=controller,
                      chunk=1 if args.stream else 8, fps=args.fps, max_frames=args.max_frames,
                      **pixel_budget(args), **visual)
    if not args.json:  # after the input was read and checked, so that an input error stays one line
        print(f"backend: {r.backend.name} ({r.backend_reason})", file=sys.stderr)
    tty = sys.stdout.isatty()
    for piece in stream:
        if args.stream:
            print(printable(piece) if tty else piece, end="", flush=True)
    res = stream.result
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        if args.stream:
            print()
        else:
            print(printable(res.text) if tty else res.text)
        t = res.timings
        print(f"answer: {res.answer!r} | {len(res.token_ids)} tokens, first token after {duration(t['ttft_s'])} "
              f"(prefill {duration(t['prefill_s'])}), decode {t['decode_tokens_per_s']:.1f} tokens/s, "
              f"{res.method} on {res.backend}", file=sys.stderr)
    if args.plot:
        from runtime.plot import plot_entropy
        plot_entropy(res, args.plot)
        if not args.json:
            print(f"entropy trace: {args.plot}", file=sys.stderr)
    return 0


def duration(seconds: float) -> str:
    """A time for people: milliseconds under a second (a tiny model's prefill is a few), else seconds."""
    return f"{seconds * 1e3:.0f} ms" if seconds < 0.9995 else f"{seconds:.2f} s"


def printable(text: str) -> str:
    """Control characters escaped (a random or broken model's bytes must not drive the terminal)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
