"""python -m export: a Hugging Face VLM checkpoint on disk -> ONNX graphs, head, manifest (and TensorRT engines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import checks
from models.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m export", formatter_class=checks.HelpFormatter,
        description="Export a Qwen2.5-VL or Qwen3-VL checkpoint directory to ONNX graphs with an explicit KV cache, "
                    "validate them against PyTorch, and optionally build TensorRT engines.")
    ap.add_argument("--model", help="checkpoint directory (config.json, *.safetensors, tokenizer files)")
    ap.add_argument("--out", help="export directory to create")
    ap.add_argument("--check", metavar="DIR", help="verify an existing export directory and exit")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="weights and activations of the graphs")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                    help="weight-only quantization of the decoder's linears (trunk graph and head) and embedding")
    ap.add_argument("--block-size", type=int, default=0,
                    help="weights per scale along each linear's input (default 128, or the largest power of two "
                         "dividing every layer when 128 does not)")
    ap.add_argument("--quant-method", choices=("rtn",), default="rtn",
                    help="rtn: round to nearest, symmetric, one scale per block (what TensorRT's INT4 weight-only "
                         "path takes); see export/quantize.py for the methods measured and left out")
    ap.add_argument("--estimate", action="store_true",
                    help="print export size and weight bytes per token for each --quantize choice from --model's "
                         "config alone (a checkpoint directory or a config.json); reads no weights")
    ap.add_argument("--max-context", type=int, default=8192, help="prompt + generated tokens")
    ap.add_argument("--max-prompt", type=int, default=6144, help="longest prefill, tokens")
    ap.add_argument("--max-frames", type=int, default=32, help="video frames per request")
    ap.add_argument("--max-vision-patches", type=int, default=0,
                    help="vision patches per call (default: from --max-frames and the processor's pixel bounds)")
    ap.add_argument("--max-batch", type=int, default=8,
                    help="requests decoded together in one TensorRT call, at most (the engine's decode profile; "
                    "ONNX Runtime and PyTorch take any number)")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset, at most 20 for TensorRT 10.3")
    ap.add_argument("--device", default="cpu", help="device to trace on: cpu, cuda or cuda:N")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch validation")
    ap.add_argument("--tensorrt", action="store_true", help="also build trunk.plan and vision.plan (needs tensorrt)")
    ap.add_argument("--print-trtexec", action="store_true",
                    help="print the trtexec commands that build the same engines (for building on a Jetson)")
    ap.add_argument("--quiet", action="store_true", help="print nothing but errors")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def run(args: argparse.Namespace) -> int:
    from export.manifest import check_export

    if args.check:
        data = check_export(checks.input_dir(args.check, "--check"))
        v = data.get("validation", {})
        validated = "validated" if v.get("status") == "passed" else f"NOT validated: {v.get('reason', v.get('status'))}"
        print(f"{args.check}: ok ({data['model_type']}, {data['precision']}, {len(data['files'])} files verified; "
              f"graphs {validated})")
        if args.print_trtexec:
            print_trtexec(Path(args.check), data)
        return 0
    if args.estimate:
        from export.estimate import estimate_table
        if not args.model:
            raise UserError("--estimate needs --model (a checkpoint directory or its config.json)")
        print(estimate_table(args.model, args.precision, args.block_size))
        return 0
    if not args.model or not args.out:
        raise UserError("pass --model DIR and --out DIR (or --check DIR)")
    from export.exporter import Limits, export_model
    from export.quantize import Quantization

    checks.input_dir(args.model, "--model")
    checks.writable_dir(Path(args.out).expanduser().parent, "--out", of=Path(args.out))
    device = checks.check_device(args.device)
    checks.check_number("--opset", args.opset, lo=14, hi=20, integer=True)
    limits = Limits(max_context=args.max_context, max_prompt=args.max_prompt, max_frames=args.max_frames,
                    max_vision_patches=args.max_vision_patches, max_batch=args.max_batch)
    out = export_model(args.model, args.out, args.precision, limits, args.opset, device, args.force,
                       not args.no_validate, args.tensorrt, args.quiet,
                       Quantization(args.quantize, args.block_size, args.quant_method))
    if not args.quiet:
        print(f"exported {args.model} -> {out}")
    if args.print_trtexec:
        from export.manifest import read_manifest
        print_trtexec(out, read_manifest(out))
    return 0


def print_trtexec(root: Path, data: dict) -> None:
    from export.exporter import Limits, trt_profiles
    from export.tensorrt_build import trtexec_command
    from models.registry import family

    cfg = family(data["model_type"]).Config.from_stored(data["config"])
    for graph, profiles in trt_profiles(cfg, Limits(**data["limits"])).items():
        print(trtexec_command(str(root / f"{graph}.onnx"), str(root / f"{graph}.plan"), profiles,
                              data["precision"], str(root / "timing.cache")))


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parser().parse_args(argv), interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    sys.exit(main())
