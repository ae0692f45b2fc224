"""python -m runtime.bench: speed and memory of each backend against transformers' own generate, side by
side in one run on the same checkpoint and inputs, with the decode roofline and V-Reason's cost.

Each measurement is repeated after warm-up; medians are reported. The roofline is the weight (and KV)
bytes a decode step must read, over the read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys

from models import checks
from models.errors import UserError, run_cli
from runtime.bench.exports import run, run_many, table, table_many
from runtime.bench.measure import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", nargs="+",
                    help="export directory to measure (or --synthetic); several (e.g. fp32, int8 and int4 exports of "
                         "one checkpoint) are measured side by side, each in its own process")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                    help="with several --engine: also measure onnxruntime-genai's fp32 and int4 CPU models of the "
                         "same decoder shape (default: when onnxruntime-genai is installed)")
    ap.add_argument("--peer-rounds", type=int, default=8,
                    help="with --peer: rounds in which each export and the peer model of its weights alternate one "
                    "request each in one process (the ratio reported is the median of the rounds')")
    ap.add_argument("--synthetic", metavar="NAME",
                    help="measure a random-weight model of a shipped config instead of an export: qwen2.5-vl-7b, "
                    "qwen2.5-vl-3b, qwen3-vl-8b, qwen3-vl-4b, qwen3-vl-2b, or small / qwen3-vl-small on CPU (static vs "
                    "dynamic decode, V-Reason, transformers; see runtime.bench.synthetic)")
    ap.add_argument("--device", default="cuda", help="with --synthetic: cuda, cuda:N or cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                    help="with --synthetic: weight precision (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--prompt-tokens", type=int, default=1200, help="with --synthetic: prompt length")
    ap.add_argument("--quantize", nargs="+", metavar="SCHEME", default=["none"],
                    help="with --synthetic: weight schemes measured side by side, each a row group (none, int8, "
                    "int4: the export's round-to-nearest codes in PyTorch's packed int4/int8 kernels)")
    ap.add_argument("--compile", action="store_true",
                    help="with --synthetic: also measure the static step under torch.compile")
    ap.add_argument("--backend", nargs="+", choices=("trt", "ort", "torch"),
                    help="backends to measure (default: trt if usable, and ort)")
    ap.add_argument("--ort-trunk", choices=("auto", "fused", "standard"), default="auto",
                    help="ort on CPU: the trunk as ONNX Runtime's fused operators, the exported graph, or auto (fused "
                    "where the export keeps its weights in trunk.onnx.data)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per measured request")
    ap.add_argument("--repeats", type=int, default=3, help="measured requests per row (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each row")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of the benchmark clip")
    ap.add_argument("--model", help="the checkpoint the export was made from: transformers' generate on it is the "
                    "baseline (without it, no baseline; the export's recorded source folder is not opened)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false",
                    help="skip the transformers generate baseline")
    ap.add_argument("--work", default="work/bench", help="where the benchmark clip is written")
    ap.add_argument("--concurrency", type=int, nargs="+", metavar="N",
                    help="with one --engine: N clients at once on one loaded model, for each N (base and V-Reason): "
                         "aggregate and per-request tokens/s, TTFT p50/p95, queue time; with --synthetic: N requests' "
                         "decode steps together at the model's shape (static with CUDA graphs, and dynamic)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="with --concurrency and one --engine: requests the engine runs at once (default: the largest "
                    "--concurrency level, so that every level's clients decode together; fewer, and the clients past "
                    "it wait for a place)")
    ap.add_argument("--plot", metavar="PNG",
                    help="with --concurrency and one --engine: also draw the report to this PNG file (aggregate "
                    "decode rate and time to first token against the number of clients, the peer's batch beside)")
    ap.add_argument("--no-hugepages", dest="hugepages", action="store_false",
                    help="leave the loaded weights in 4 KB pages (CPU; by default each export's are moved into 2 MB "
                    "pages after loading, and the move is waited for before measuring: runtime.hugepages)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--save", metavar="PATH",
                    help="also write the report to PATH as JSON; with --synthetic it is rewritten after every measured "
                    "row, so a run stopped early (a time limit) keeps the rows it finished (\"complete\": false)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    def go(args) -> int:
        checks.check_number("--new-tokens", args.new_tokens, lo=2, integer=True)
        checks.check_number("--repeats", args.repeats, lo=1, integer=True)
        checks.check_number("--warmup", args.warmup, lo=0, integer=True)
        checks.check_number("--peer-rounds", args.peer_rounds, lo=1, integer=True)
        checks.check_number("--seconds", args.seconds, lo=0.5, hi=600)
        if args.save:
            args.save = checks.output_file(args.save, "--save", suffix=".json")
        if args.plot:
            if not args.concurrency or args.synthetic:
                raise UserError("--plot draws the report of --concurrency on one --engine; pass --concurrency")
            args.plot = checks.output_file(args.plot, "--plot", suffix=".png")
            checks.plotting_available()

        def report(rep: dict, text: str) -> int:
            if args.save:
                write_report(args.save, rep)
            print(json.dumps(rep, indent=2) if args.json else text)
            if args.plot:
                from runtime.plot import plot_concurrency

                print(f"plot: {plot_concurrency(rep, args.plot)}", file=sys.stderr)
            return 0

        if args.synthetic:
            from runtime.bench.synthetic import run_synthetic, synthetic_table

            checks.check_number("--prompt-tokens", args.prompt_tokens, lo=32, integer=True)
            args.device = checks.check_device(args.device)
            if args.concurrency:
                from runtime.bench.batched import batched_table, run_batched

                for n in args.concurrency:
                    checks.check_number("--concurrency", n, lo=1, hi=256, integer=True)
                rep = run_batched(args)
                return report(rep, batched_table(rep))
            rep = run_synthetic(args)
            return report(rep, synthetic_table(rep))
        if not args.engine:
            raise UserError("pass --engine DIR (an export) or --synthetic NAME")
        for e in args.engine:
            checks.input_dir(e, "--engine")
        checks.writable_dir(args.work, "--work")
        if args.concurrency:
            from runtime.bench.concurrency import concurrency_table, run_concurrency

            if len(args.engine) > 1:
                raise UserError("--concurrency measures one export: pass one --engine")
            for n in args.concurrency:
                checks.check_number("--concurrency", n, lo=1, hi=256, integer=True)
            if args.max_batch is not None:
                checks.check_number("--max-batch", args.max_batch, lo=1, hi=256, integer=True)
            args.engine = args.engine[0]
            rep = run_concurrency(args)
            return report(rep, concurrency_table(rep))
        if len(args.engine) > 1:
            if args.peer is None:
                import importlib.util
                args.peer = importlib.util.find_spec("onnxruntime_genai") is not None
            rep = run_many(args)
            return report(rep, table_many(rep))
        args.engine = args.engine[0]
        rep = run(args)
        return report(rep, table(rep))

    return run_cli(go, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
