"""One sample evaluated with one method, and the record of one that could not be (shared by local and Ray runs)."""

from __future__ import annotations

import time
from pathlib import Path

from models.errors import UserError
from runtime.eval import protocol as proto
from runtime.eval.data import Sample, resolve_media


def evaluate_one(reasoner, s: Sample, root: Path, method: str, args, controller, sampling, budget: dict) -> dict:
    """One sample with one method, recorded whatever happens: a sample the export refuses (a UserError: too
    long, unreadable media) and a sample whose model call fails for any other reason are scored 0, with the
    reason, and the run goes on (the same in local and Ray runs)."""
    rec = {"dataset": s.dataset, "id": s.id, "index": s.index, "method": method, "problem_type": s.problem_type,
           "solution": s.solution, "options": s.options}
    t0 = time.perf_counter()
    try:
        media = resolve_media(root, s.path)
        visual = {"video": media} if s.data_type == "video" else {"image": media}
        question, options, template = proto.prompt(args.protocol, s.problem, s.problem_type, s.options)
        res = reasoner.ask(question=question, method=method, max_new_tokens=args.max_new_tokens,
                           template=template or args.template, options=options, sampling=sampling,
                           controller=controller, **budget, **visual)
        metric, value = proto.score(args.protocol, s.problem_type, res.text, res.answer, s.solution, s.options)
        rec |= {"answer": res.answer, "text": res.text, "tokens": len(res.token_ids), "metric": metric,
                "score": value, "ema": res.ema, "latency_s": time.perf_counter() - t0, "error": None,
                "error_kind": None, "prompt_tokens": len(res.prompt_token_ids),
                "video_frames": res.visual.get("frames") if res.visual.get("kind") == "video" else 0,
                "frame_size": res.visual.get("frame_size"), "vision_tokens": res.visual.get("tokens", 0)}
    except UserError as e:  # refused: the sample does not fit the export, or its media cannot be read
        rec = failed(s, method, args.protocol, str(e), time.perf_counter() - t0, kind="refused")
    except Exception as e:  # noqa: BLE001 (any other failure of the model call is recorded, not fatal)
        rec = failed(s, method, args.protocol, f"{type(e).__name__}: {e}", time.perf_counter() - t0)
    return rec


def failed(s: Sample, method: str, protocol: str, why: str, seconds: float = 0.0, kind: str = "failed") -> dict:
    """The record of a sample that could not be answered: scored 0, with the reason; ``kind``: ``refused`` (the
    export or the input said no) or ``failed`` (the call broke)."""
    metric, _ = proto.score(protocol, s.problem_type, "", "", s.solution, s.options)
    return {"dataset": s.dataset, "id": s.id, "index": s.index, "method": method, "problem_type": s.problem_type,
            "solution": s.solution, "options": s.options, "answer": "", "text": "", "tokens": 0, "metric": metric,
            "score": 0.0, "ema": [], "latency_s": seconds, "error": why, "error_kind": kind, "prompt_tokens": None,
            "video_frames": None, "frame_size": None, "vision_tokens": None}
