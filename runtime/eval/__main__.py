"""python -m runtime.eval: accuracy, output tokens and latency of base / V-Reason / V-Reason (Lite) on
evaluation files of the Video-R1 family (or the bundled sample set with --sample)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from models.errors import UserError, run_cli
from runtime.eval.data import Sample, load_samples, resolve_media
from runtime.eval.metrics import score
from runtime.eval.report import markdown, write_reports

METHODS = ("base", "vreason", "vreason-lite")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, help="export directory")
    ap.add_argument("--data", nargs="+", default=[], help="evaluation files (JSON list or JSONL); one dataset each")
    ap.add_argument("--sample", action="store_true", help="write and evaluate the bundled sample set (offline)")
    ap.add_argument("--video-root", help="folder the samples' paths are relative to (default: each file's folder)")
    ap.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", required=True, help="results folder (samples.jsonl, summary.json, results.md, plots)")
    ap.add_argument("--limit", type=int, default=0, help="first N samples of each file")
    ap.add_argument("--max-frames", type=int, default=None, help="frames per video (the paper used 16-32)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--backend", default="auto", choices=("auto", "trt", "ort", "torch"))
    ap.add_argument("--template", default="reasoning", choices=("reasoning", "plain"))
    ap.add_argument("--debug", action="store_true")
    return ap


def run(args) -> dict:
    from tqdm import tqdm

    from runtime.reasoner import Reasoner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in args.data]
    if args.sample:
        from runtime.eval.samples import write_sample_set
        files.append(write_sample_set(out / "sample-set"))
    if not files:
        raise UserError("give --data FILE [FILE ...] or --sample")
    samples: list[tuple[Sample, Path]] = []
    for f in files:
        rows = load_samples(f)
        root = Path(args.video_root) if args.video_root else f.parent
        samples += [(s, root) for s in (rows[: args.limit] if args.limit else rows)]
    reasoner = Reasoner.load(args.engine, backend=args.backend)
    if args.max_frames:
        reasoner.settings.max_frames = args.max_frames
    log = out / "samples.jsonl"
    done = set()
    records = []
    if log.is_file():  # resume: finished (dataset, id, method) are skipped
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["dataset"], r["id"], r["method"]))
                records.append(r)
    todo = [(s, root, m) for s, root in samples for m in args.method if (s.dataset, s.id, m) not in done]
    print(f"{len(samples)} samples x {len(args.method)} methods; {len(todo)} to run, {len(done)} done earlier "
          f"(backend {reasoner.backend.name})", file=sys.stderr)
    with open(log, "a", encoding="utf-8") as fh:
        for sample, root, method in tqdm(todo, desc="eval", unit="answer", file=sys.stderr):
            rec = evaluate_one(reasoner, sample, root, method, args)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            records.append(rec)
    summary = write_reports(records, out)
    print(markdown(summary))
    return summary


def evaluate_one(reasoner, s: Sample, root: Path, method: str, args) -> dict:
    rec = {"dataset": s.dataset, "id": s.id, "method": method, "problem_type": s.problem_type}
    t0 = time.perf_counter()
    try:
        media = resolve_media(root, s.path)
        visual = {"video": media} if s.data_type == "video" else {"image": media}
        res = reasoner.ask(question=s.problem, method=method, max_new_tokens=args.max_new_tokens,
                           template=args.template, options=s.options or None, **visual)
        metric, value = score(s.problem_type, res.answer, s.solution, s.options)
        rec |= {"answer": res.answer, "text": res.text, "tokens": len(res.token_ids), "metric": metric,
                "score": value, "ema": res.ema, "latency_s": time.perf_counter() - t0, "error": None}
    except UserError as e:  # a bad sample is recorded, scored 0, and the run goes on
        metric, _ = score(s.problem_type, "", s.solution, s.options)
        rec |= {"answer": "", "text": "", "tokens": 0, "metric": metric, "score": 0.0, "ema": [],
                "latency_s": time.perf_counter() - t0, "error": str(e)}
    return rec


def main(argv: list[str] | None = None) -> int:
    def go(args) -> int:
        run(args)
        return 0

    return run_cli(go, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
