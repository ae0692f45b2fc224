"""The entropy trace of an answer: per-token entropy, its EMA, the running peak, and the steps where the
controller raised (alpha = +1) or lowered (alpha = -1) entropy, shaded. matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path

from models.errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_entropy(result, path: str | Path, title: str | None = None) -> Path:
    plt = _pyplot()
    h, ema, alpha = result.entropy, result.ema, result.alpha
    steps = list(range(len(h)))
    peak, best = [], float("-inf")
    for e in ema:
        best = max(best, e)
        peak.append(best)
    fig, ax = plt.subplots(figsize=(9, 4.0), dpi=110)
    for k, a in enumerate(alpha):
        if a:
            ax.axvspan(k - 0.5, k + 0.5, color="tab:orange" if a > 0 else "tab:blue", alpha=0.15, lw=0)
    ax.plot(steps, h, lw=0.8, color="0.55", label="entropy $H_k$")
    ax.plot(steps, ema, lw=2.0, color="tab:red", label="EMA $E_k$")
    ax.plot(steps, peak, lw=1.0, ls="--", color="black", label="running peak of EMA")
    if any(a > 0 for a in alpha):
        ax.plot([], [], color="tab:orange", alpha=0.4, lw=6, label="controller raised entropy")
    if any(a < 0 for a in alpha):
        ax.plot([], [], color="tab:blue", alpha=0.4, lw=6, label="controller lowered entropy")
    ax.set_xlabel("answer token")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title or f"{result.method} on {result.backend}: {len(h)} tokens")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_concurrency(rep: dict, path: str | Path) -> Path:
    """``runtime.bench --concurrency``'s report as two panels: the aggregate decode rate against the number of
    clients (base and V-Reason, beside N times one client's rate, and onnxruntime-genai's batch where measured), and
    the time to first token (p50, with p95 above it)."""
    plt = _pyplot()
    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colors = {"base": "tab:blue", "vreason": "tab:red"}
    names = {"base": "base", "vreason": "V-Reason"}
    for method, rows in rep["methods"].items():
        n = [row["clients"] for row in rows]
        # (None: more clients than max_batch, never all decoding at once; not drawn)
        agg = [float("nan") if row["aggregate_decode_tokens_per_s"] is None else row["aggregate_decode_tokens_per_s"]
               for row in rows]
        c, name = colors.get(method, "0.3"), names.get(method, method)
        rate.plot(n, agg, "o-", color=c, label=f"{name}, measured")
        if n[0] == 1 and agg[0] > 0:
            rate.plot(n, [agg[0] * k for k in n], ":", color=c, lw=1, label=f"{name}, N x one client")
        p50 = [row["ttft_p50_s"] for row in rows]
        p95 = [row["ttft_p95_s"] for row in rows]
        ttft.errorbar(n, p50, yerr=[[0] * len(n), [b - a for a, b in zip(p50, p95)]], fmt="o-", color=c, capsize=4,
                      label=f"{name}: p50, bar to p95")
    peer = rep.get("peer")
    if peer:
        ratio = peer.get("ours_over_peer")
        rate.plot([peer["batch"]], [peer["aggregate_decode_tokens_per_s"]], "*", ms=14, color="black",
                  label=f"onnxruntime-genai {peer['precision']}, batch of {peer['batch']}"
                        + (f" (ours / it per round x{ratio:.2f})" if ratio else ""))
    levels = rep["levels"]
    for ax in (rate, ttft):
        ax.set_xticks(levels)
        ax.set_xlabel("clients at once")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    rate.set_ylabel("aggregate decode tokens/s")
    rate.set_title("decode rate, all clients together")
    ttft.set_ylabel("time to first token (s)")
    ttft.set_title("time to first token, queueing included")
    fig.suptitle(f"{Path(rep['engine']).name} on {rep['backend']}: {rep['new_tokens']} new tokens, "
                 f"{rep['repeats']} waves per level, up to {rep['max_batch']} requests running", fontsize=10)
    return _save(plt, fig, path)
