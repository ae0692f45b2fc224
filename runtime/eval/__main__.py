"""python -m runtime.eval: accuracy, output tokens and latency of base / V-Reason / V-Reason (Lite) on
evaluation files of the Video-R1 family (or the bundled sample set with --sample), with the prompts and
scoring of Video-R1's evaluation (--protocol video-r1, the default) or this project's lenient scoring.

Results go to --out: samples.jsonl (one record per sample and method, written as it finishes), run.json
(the settings the records were made with), summary.json, results.md and plots. A rerun with the same
settings skips what is finished; a run with other settings (engine, backend, protocol, template,
max_new_tokens, frames and pixels, sampling, controller) into the same --out is refused, naming what differs.
``--rescore FILE ...`` scores saved outputs (this project's samples.jsonl, or Video-R1's output files) without
a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from controller.config import METHODS
from models import checks
from models.errors import UserError, run_cli
from runtime.eval import protocol as proto
from runtime.eval.data import Sample, load_samples
from runtime.eval.report import markdown, write_reports
from runtime.eval.step import evaluate_one, failed

RESULT_FILES = ("samples.jsonl", "run.json", "summary.json", "results.md", "entropy_curves.png",
                "accuracy_vs_tokens.png")


def parser() -> argparse.ArgumentParser:
    from controller.config import add_cli_arguments
    from runtime.sampling import add_cli_arguments as add_sampling_arguments

    ap = argparse.ArgumentParser(prog="python -m runtime.eval", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", help="export directory (required unless --rescore)")
    ap.add_argument("--data", nargs="+", default=[], help="evaluation files (JSON list or JSONL); one dataset each")
    ap.add_argument("--sample", action="store_true", help="write and evaluate the bundled sample set (offline)")
    ap.add_argument("--video-root", help="folder the samples' paths are relative to (default: each file's folder)")
    ap.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    ap.add_argument("--out", help="results folder (samples.jsonl, summary.json, results.md, plots; required unless "
                    "--rescore)")
    ap.add_argument("--rescore", nargs="+", metavar="FILE",
                    help="score saved outputs instead of running a model: this project's samples.jsonl or "
                    "Video-R1's output files ({\"results\": [{\"problem_type\", \"solution\", \"output\", ...}]})")
    ap.add_argument("--json", action="store_true", help="with --rescore: print one JSON object")
    ap.add_argument("--retry-refused", action="store_true",
                    help="run again the samples an earlier run in --out refused or failed on (after fixing the cause: "
                         "a larger export, readable media); without it they stay as recorded, scored 0")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete the results already in --out (made with other settings) and start again")
    ap.add_argument("--protocol", choices=proto.PROTOCOLS, default="video-r1",
                    help="video-r1: Video-R1's evaluation (its prompts, frames, pixels and reward_fn: OCR and "
                    "free-form score 0); video-r1-reward: the same with its training reward for OCR (word error "
                    "rate) and free-form (ROUGE); lenient: this project's --template prompt, option text "
                    "accepted, MRA for numerical answers, the checkpoint's frame and pixel settings")
    ap.add_argument("--template", default="reasoning", choices=("reasoning", "plain"),
                    help="prompt template of the lenient protocol (video-r1 brings its own prompt)")
    ap.add_argument("--limit", type=int, default=0, help="first N samples of each file (0: all)")
    b = proto.VIDEO_R1_BUDGET
    ap.add_argument("--max-frames", type=int, default=None,
                    help=f"most frames per video (default: video-r1 protocols {b['max_frames']}, within the "
                    "export's --max-frames; lenient: the export's --max-frames)")
    ap.add_argument("--fps", type=float, default=None,
                    help=f"video sampling rate (default: video-r1 protocols {b['fps']}; lenient: the checkpoint's "
                    "processor setting)")
    from models.inputs import add_pixel_arguments
    add_pixel_arguments(ap, {k: f"video-r1 protocols {v}; lenient: the checkpoint's processor setting"
                             for k, v in b.items()})
    ap.add_argument("--max-new-tokens", type=int, default=1024,
                    help="answer length limit; 1024 as in Video-R1's evaluation (python -m runtime defaults to 512)")
    ap.add_argument("--backend", default="auto", choices=("auto", "trt", "ort", "torch"),
                    help="auto: trt when tensorrt and a GPU are usable, else ort")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda for trt, cpu otherwise); with --ray, "
                    "the replicas' device")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    g = ap.add_argument_group("scale-out on Ray (optional: pip install ray)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster: a local one when no address is given, 'auto' for the cluster this "
                   "machine belongs to, or ray://HOST:PORT")
    g.add_argument("--replicas", type=int, default=2, help="with --ray: Reasoner replicas (one per GPU, or per "
                   "--cpus-per-replica cores)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="with --ray: CPU cores each replica takes (its ONNX Runtime and PyTorch threads)")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica takes")
    g.add_argument("--max-retries", type=int, default=2,
                   help="with --ray: tries again of a sample whose replica died, before it is recorded as failed")
    add_sampling_arguments(ap)
    add_cli_arguments(ap)
    return ap


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def budget_of(args, limit: int) -> dict:
    """The frames and pixels every sample is given: the protocol's defaults, the options given, and the
    protocol's frame count brought within the export's limit of ``limit`` frames (with a note)."""
    from models.inputs import pixel_budget

    b = proto.budget(args.protocol, fps=args.fps, max_frames=args.max_frames, **pixel_budget(args))
    if args.max_frames is None and b["max_frames"] is not None and b["max_frames"] > limit:
        print(f"note: this export takes at most {limit} frames; the {args.protocol} protocol's "
              f"{b['max_frames']} becomes {limit}", file=sys.stderr)
        b["max_frames"] = limit
    return b


def settings_of(args, backend: str, decode: str, controller, sampling) -> dict:
    """Everything besides the method and the sample that changes an answer or its score."""
    manifest = (Path(args.engine).expanduser() / "manifest.json").read_bytes()
    limit = json.loads(manifest)["limits"]["max_frames"]
    return {
        "engine_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "backend": backend, "device": args.device, "decode": decode, "protocol": args.protocol,
        "template": None if args.protocol in proto.VIDEO_R1 else args.template,
        "max_new_tokens": args.max_new_tokens, "budget": budget_of(args, limit),
        "sampling": sampling.to_dict(), "controller": controller.to_dict(),
    }


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / "run.json"
    if not run_file.is_file():
        return
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        if not overwrite:
            raise UserError(f"{run_file} is corrupt ({e}); use --overwrite to delete the results in {out} and "
                            "start again") from None
        before = None  # corrupt, and --overwrite given
    if before is not None:
        diff = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if not diff:
            return
    if overwrite:
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
        return
    old, new = _leaves(before), _leaves(settings)
    fields = [k for k in sorted(set(old) | set(new)) if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    shown = "; ".join(f"{k}: {_shown(old.get(k, _ABSENT))} -> {_shown(new.get(k, _ABSENT))}" for k in fields)
    raise UserError(f"{out} holds results made with other settings ({shown}); use another --out, or --overwrite "
                    "to delete them")


_ABSENT = object()


def _leaves(d: dict, prefix: str = "") -> dict:
    """A nested settings dict as {dotted.path: value}: a difference is named by the field that differs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(v) -> str:
    if v is _ABSENT:
        return "(none)"
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def run(args) -> dict:
    from controller.config import config_from_args
    from runtime.sampling import params_from_args

    if args.rescore:
        from runtime.eval.rescore import rescore_files

        return rescore_files([checks.input_file(f, "--rescore") for f in args.rescore], args.protocol, args.json)
    if not args.engine or not args.out:
        raise UserError("give --engine DIR and --out DIR (or --rescore FILE ... to score saved outputs)")
    # every input and output checked, every setting validated, before anything is loaded or computed
    checks.input_dir(args.engine, "--engine")
    files = [checks.input_file(f, "--data") for f in args.data]
    if not files and not args.sample:
        raise UserError("give --data FILE [FILE ...] or --sample")
    if args.video_root:
        checks.input_dir(args.video_root, "--video-root")
    out = checks.writable_dir(args.out, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    checks.check_number("--limit", args.limit, lo=0, integer=True)
    checks.check_number("--max-new-tokens", args.max_new_tokens, lo=1, integer=True)
    checks.check_number("--max-frames", args.max_frames, lo=1, integer=True, optional=True)
    checks.check_number("--fps", args.fps, lo=0, lo_open=True, hi=1000, optional=True)
    from models.inputs import pixel_budget
    for name, v in pixel_budget(args).items():
        checks.check_number("--" + name.replace("_", "-"), v, lo=1, integer=True, optional=True)
    if args.device is not None and not args.ray:
        checks.check_device(args.device)
    elif args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r} is not a device; use cpu or cuda (cuda:N for another GPU)")
    if args.ray:
        checks.check_number("--replicas", args.replicas, lo=1, integer=True)
        checks.check_number("--cpus-per-replica", args.cpus_per_replica, lo=0, lo_open=True)
        checks.check_number("--gpus-per-replica", args.gpus_per_replica, lo=0)
        checks.check_number("--max-retries", args.max_retries, lo=0, integer=True)
        from runtime.eval.distributed import import_ray
        import_ray()
    controller, sampling = config_from_args(args), params_from_args(args)
    created = not out.exists()
    try:
        return _run(args, out, files, controller, sampling)
    except BaseException:
        if created and out.is_dir() and not (out / "samples.jsonl").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a failed eval leaves no empty --out behind
        raise


def _run(args, out: Path, files: list[Path], controller, sampling) -> dict:
    from runtime.reasoner import Reasoner

    out.mkdir(parents=True, exist_ok=True)
    if args.sample:
        from runtime.eval.samples import write_sample_set
        files.append(write_sample_set(out / "sample-set"))
    samples: list[tuple[Sample, Path, str]] = []
    for f in files:
        rows = load_samples(f)
        root = Path(args.video_root) if args.video_root else f.parent
        sha = file_sha(f)
        samples += [(s, root, sha) for s in (rows[: args.limit] if args.limit else rows)]
    proto.check(args.protocol, {s.problem_type for s, _, _ in samples})
    plots = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = False
        print("note: matplotlib is not installed: no plots will be drawn (pip install matplotlib)", file=sys.stderr)
    pool = reasoner = None
    if args.ray:  # the replicas load the engine; the driver holds none
        from runtime.eval.distributed import open_pool

        pool = open_pool(args)
        backend, decode = pool.info
    else:
        reasoner = Reasoner.load(args.engine, backend=args.backend, device=args.device)
        backend, decode = reasoner.backend.name, reasoner.decode
    try:
        return _evaluate(args, out, samples, controller, sampling, settings_of(args, backend, decode, controller,
                                                                                sampling), reasoner, pool, plots)
    finally:
        if pool is not None:
            pool.close()


def _evaluate(args, out, samples, controller, sampling, settings, reasoner, pool, plots) -> dict:
    from tqdm import tqdm

    check_settings(out, settings, args.overwrite)
    (out / "run.json").write_text(json.dumps(settings, indent=2))
    log = out / "samples.jsonl"
    wanted = {(s.dataset, sha, s.index, m) for s, _, sha in samples for m in args.method}
    done = {(r["dataset"], r.get("file_sha"), r.get("index"), r["method"]): r for r in read_records(log)}
    if getattr(args, "retry_refused", False):  # their new records, appended, replace them (the last one counts)
        done = {k: r for k, r in done.items() if not r.get("error")}
    todo = [(s, root, sha, m) for s, root, sha in samples for m in args.method
            if (s.dataset, sha, s.index, m) not in done]
    earlier = [done[k] for k in wanted if k in done]
    refused_earlier = sum(1 for r in earlier if r.get("error"))
    print(f"{len(samples)} samples x {len(args.method)} methods; {len(todo)} to run, "
          f"{len(earlier) - refused_earlier} done earlier"
          + (f", {refused_earlier} refused or failed earlier (kept, scored 0; after fixing the cause, "
             "--retry-refused runs them again)" if refused_earlier else "")
          + f" (backend {settings['backend']}, protocol {args.protocol}"
          + (f", {pool.n} Ray replicas" if pool else "") + ")",
          file=sys.stderr)
    with open(log, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="eval", unit="answer",
                                                       file=sys.stderr) as progress:
        def record(item, rec) -> None:  # the driver alone writes results, whichever process made them
            sample, _, sha, method = item
            rec["file_sha"] = sha
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[(sample.dataset, sha, sample.index, method)] = rec

        if pool is not None:
            from runtime.eval.distributed import run_distributed

            facts = run_distributed(pool, args, todo, controller, sampling, settings["budget"], record,
                                    lambda item, why: failed(item[0], item[3], args.protocol, why), progress)
            if facts["samples"]:
                print(f"ray: {facts['replicas']} replicas, {facts['samples_per_s']:.2f} samples/s, driver round trip "
                      f"{100 * facts['overhead_fraction']:.1f}% over a sample's own time", file=sys.stderr)
        else:
            for item in todo:
                sample, root, _, method = item
                record(item, evaluate_one(reasoner, sample, root, method, args, controller, sampling,
                                          settings["budget"]))
                progress.update(1)
    records = [done[k] for k in sorted(wanted, key=str) if k in done]  # only what this run asked for
    summary = write_reports(records, out, settings, plots=plots)
    print(markdown(summary, settings))
    warn_failures(summary)
    if records and all(r.get("error") for r in records):
        first = next(r["error"] for r in records if r.get("error"))
        raise UserError(f"none of the {len(records)} answers was given: every sample was refused or failed "
                        f"(first: {first}); results in {out}")
    return summary


def read_records(log: Path) -> list[dict]:
    """The records of an earlier run (resume). A half-written last line (what a crash leaves) is dropped with a
    warning and its sample is run again; a broken line elsewhere is one error naming the file and the line."""
    if not log.is_file():
        return []
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    last = max((n for n, ln in enumerate(lines) if ln.strip()), default=-1)
    records = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError("not a JSON object")
            records.append(r)
        except ValueError as e:
            if n != last:
                raise UserError(f"{log} line {n + 1} is not a record ({e}); use --overwrite to start again") from None
            print(f"warning: {log} ends in a half-written line (a crash?); dropped, its sample runs again",
                  file=sys.stderr)
            log.write_text("".join(ln + "\n" for ln in lines[:n]), encoding="utf-8")
            return records
    if text and not text.endswith("\n"):  # complete, but the next record must start on its own line
        with open(log, "a", encoding="utf-8") as fh:
            fh.write("\n")
    return records


def warn_failures(summary: dict) -> None:
    """One line per kind of trouble at the end of a run, and the first failure's reason in full."""
    refused = sum(m["refused"] for m in summary.values())
    broke = sum(m["failed"] for m in summary.values())
    if refused:
        print(f"warning: {refused} answers were refused and scored 0 (see error in samples.jsonl); first: "
              f"{next(m['first_refused'] for m in summary.values() if m['first_refused'])}", file=sys.stderr)
    if broke:
        print(f"warning: {broke} answers failed and were scored 0; first failure: "
              f"{next(m['first_failed'] for m in summary.values() if m['first_failed'])}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    def go(args) -> int:
        run(args)
        return 0

    return run_cli(go, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
