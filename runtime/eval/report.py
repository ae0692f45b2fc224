"""summary.json, the markdown table (laid out like the paper's) and the two plots of an eval run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

POSITIONS = 50  # points of the normalized answer position axis


def error_kind(r: dict) -> str | None:
    """``refused`` (the export or the input said no), ``failed`` (the call broke) or None."""
    if not r.get("error"):
        return None
    return r.get("error_kind") or "failed"


def summarize(records: list[dict]) -> dict:
    """{method: {"datasets": {dataset: {metric: mean}}, "avg_tokens", "avg_latency_s", "n", "errors", "refused",
    "failed", "problems": {dataset: {"refused": n, "failed": n}}, "reasons": {first line: count},
    "first_refused", "first_failed"}}. Every record counts (repeated sample ids included)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    out = {}
    for method, rows in by_method.items():
        ds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        problems: dict[str, dict[str, int]] = defaultdict(lambda: {"refused": 0, "failed": 0})
        reasons: dict[str, int] = defaultdict(int)
        first: dict[str, str | None] = {"refused": None, "failed": None}
        for r in rows:
            ds[r["dataset"]][r["metric"]].append(r["score"])
            kind = error_kind(r)
            if kind:
                problems[r["dataset"]][kind] += 1
                reasons[str(r["error"]).splitlines()[0][:200]] += 1
                first[kind] = first[kind] or str(r["error"])
        ok = [r for r in rows if not r.get("error")]
        out[method] = {
            "datasets": {d: {m: float(np.mean(v)) for m, v in ms.items()} for d, ms in ds.items()},
            "n": len(rows), "errors": len(rows) - len(ok),
            "refused": sum(p["refused"] for p in problems.values()),
            "failed": sum(p["failed"] for p in problems.values()),
            "problems": {d: dict(p) for d, p in problems.items()}, "reasons": dict(reasons),
            "first_refused": first["refused"], "first_failed": first["failed"],
            "avg_tokens": float(np.mean([r["tokens"] for r in ok])) if ok else 0.0,
            "avg_latency_s": float(np.mean([r["latency_s"] for r in ok])) if ok else 0.0,
            "overall": float(np.mean([r["score"] for r in rows])) if rows else 0.0,
        }
    return out


def markdown(summary: dict, settings: dict | None = None) -> str:
    """Rows = methods, columns = (dataset, metric) in percent, then average tokens and latency; the
    settings the numbers were made with below the table."""
    cols = sorted({(d, m) for s in summary.values() for d, ms in s["datasets"].items() for m in ms})
    names = {"acc": "Acc", "mra": "MRA", "exact": "EM"}
    head = ["Method", *[f"{d} {names.get(m, m)}" for d, m in cols], "avg tokens", "latency (s)", "refused",
            "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [f"{100 * s['datasets'].get(d, {}).get(m, float('nan')):.1f}" for d, m in cols]
        lines.append("| " + " | ".join([method, *cells, f"{s['avg_tokens']:.0f}", f"{s['avg_latency_s']:.2f}",
                                        str(s.get("refused", 0)), str(s.get("failed", s["errors"]))]) + " |")
    troubled = sorted({d for s in summary.values() for d in s.get("problems", {})})
    if troubled:
        lines += ["", "Refused / failed answers per dataset (scored 0; reasons in samples.jsonl): "
                  + "; ".join(f"{m} {d}: {p['refused']} refused, {p['failed']} failed"
                              for m, s in summary.items() for d, p in sorted(s.get("problems", {}).items()))]
    if settings:
        b = settings.get("budget") or {}
        given = ", ".join(f"{k} {v}" for k, v in b.items() if v is not None) or "the checkpoint's and export's"
        lines += ["", f"protocol {settings['protocol']}"
                  + (f" (template {settings['template']})" if settings.get("template") else "")
                  + f", backend {settings['backend']}, max_new_tokens {settings['max_new_tokens']}",
                  f"frames and pixels: {given}",
                  "sampling: " + ", ".join(f"{k} {v}" for k, v in settings["sampling"].items()),
                  "V-Reason controller (vreason, vreason-lite): "
                  + ", ".join(f"{k} {v}" for k, v in settings["controller"].items())]
    return "\n".join(lines) + "\n"


def mean_ema_curves(records: list[dict]) -> dict[str, np.ndarray]:
    grid = np.linspace(0, 1, POSITIONS)
    curves: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in records:
        ema = r.get("ema") or []
        if len(ema) >= 2:
            curves[r["method"]].append(np.interp(grid, np.linspace(0, 1, len(ema)), ema))
        elif len(ema) == 1:
            curves[r["method"]].append(np.full(POSITIONS, ema[0]))
    return {m: np.mean(c, axis=0) for m, c in curves.items() if c}


def write_plots(records: list[dict], summary: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    curves = mean_ema_curves(records)
    for method, curve in curves.items():
        ax.plot(np.linspace(0, 1, POSITIONS), curve, lw=2, label=method)
    ax.set_xlabel("normalized answer position")
    ax.set_ylabel("mean EMA entropy (nats)")
    ax.set_title("Entropy over the answer, mean per method")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    paths.append(out / "entropy_curves.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    markers = "osD^v"
    for i, (method, s) in enumerate(summary.items()):  # markers and a legend: methods may coincide
        ax.scatter(s["avg_tokens"], 100 * s["overall"], s=80 - 15 * i, marker=markers[i % len(markers)],
                   label=f"{method}: {100 * s['overall']:.1f}%, {s['avg_tokens']:.0f} tokens", alpha=0.8)
    ax.set_xlabel("average output tokens")
    ax.set_ylabel("mean score (%)")
    ax.set_ylim(-3, 103)
    if summary:
        ax.legend(fontsize=8)
    ax.set_title("Accuracy against output length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_tokens.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def write_reports(records: list[dict], out: Path, settings: dict | None = None, plots: bool = True) -> dict:
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps({"settings": settings, "methods": summary}, indent=2))
    (out / "results.md").write_text(markdown(summary, settings))
    if plots:
        write_plots(records, summary, out)
    return summary
