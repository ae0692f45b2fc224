"""python -m runtime: answer a question about a video, a folder of frames or an image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, help="export directory made by `python -m export`")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (sampled at --fps within the frame budget)")
    src.add_argument("--frames", help="folder of images used, in name order, as the video's frames")
    src.add_argument("--image", help="image file")
    q = ap.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="the question")
    q.add_argument("--question-file", help="UTF-8 text file holding the question")
    ap.add_argument("--backend", choices=("auto", "trt", "ort", "torch"), default="auto",
                    help="auto: trt when tensorrt and a GPU are usable, else ort (default auto)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda for trt, cpu otherwise)")
    ap.add_argument("--model", help="original checkpoint directory (torch backend only; default: the export's source)")
    ap.add_argument("--method", choices=("base", "vreason", "vreason-lite"), default="base",
                    help="base decoding, V-Reason, or V-Reason with Lite video-token pruning (default base)")
    ap.add_argument("--template", choices=("reasoning", "plain"), default="reasoning",
                    help="reasoning: think, then answer inside <answer></answer>; plain: the question only")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    ap.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--fps", type=float, default=2.0, help="frame rate --frames are taken at (default 2.0); "
                    "for --video, the sampling rate")
    ap.add_argument("--max-frames", type=int, default=None, help="sample at most this many video frames")
    ap.add_argument("--stream", action="store_true", help="print tokens as they come")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the result")
    ap.add_argument("--plot", metavar="PNG", help="write the entropy trace of the answer")
    ap.add_argument("--decode", choices=("auto", "static", "dynamic"), default="auto",
                    help="static: fixed-shape decode steps (torch backend; CUDA graphs on GPU); dynamic: the cache "
                    "grows per token (every backend); auto: static for --backend torch on CUDA (default auto)")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="with static decode on CUDA, run each step eagerly instead of replaying a CUDA graph")
    ap.add_argument("--compile", action="store_true",
                    help="with static decode on CUDA, torch.compile the trunk step (slow first request)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip hashing the export's files (presence, sizes and graph I/O are still checked)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    from controller.config import add_cli_arguments
    add_cli_arguments(ap)
    return ap


def read_question(args) -> str:
    if args.question is not None:
        return args.question
    p = Path(args.question_file)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"question file {p} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"question file {p} is not UTF-8 text") from None


def run(args) -> int:
    from controller.config import config_from_args
    from runtime.reasoner import Reasoner
    from runtime.sampling import SamplingParams

    question = read_question(args)
    r = Reasoner.load(args.engine, backend=args.backend, device=args.device, model_dir=args.model,
                      verify=not args.no_verify, decode=args.decode,
                      cuda_graphs=False if args.no_cuda_graphs else None, compile=args.compile)
    if args.max_frames:
        r.settings.max_frames = args.max_frames
    if args.video:
        r.settings.fps = args.fps
    visual = {"video": args.video} if args.video else {"frames": args.frames, "fps": args.fps} if args.frames \
        else {"image": args.image}
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    stream = r.stream(question=question, method=args.method, max_new_tokens=args.max_new_tokens,
                      template=args.template, sampling=sampling, stop=args.stop,
                      controller=config_from_args(args), chunk=1 if args.stream else 8, **visual)
    if not args.json:  # after the input was read and checked, so that an input error stays one line
        print(f"backend: {r.backend.name} ({r.backend_reason})", file=sys.stderr)
    for piece in stream:
        if args.stream and not args.json:
            print(piece, end="", flush=True)
    res = stream.result
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        if args.stream:
            print()
        else:
            print(res.text)
        t = res.timings
        print(f"answer: {res.answer!r} | {len(res.token_ids)} tokens, prefill {t['prefill_s']:.2f} s, "
              f"decode {t['decode_tokens_per_s']:.1f} tokens/s, {res.method} on {res.backend}", file=sys.stderr)
    if args.plot:
        from runtime.plot import plot_entropy
        plot_entropy(res, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
