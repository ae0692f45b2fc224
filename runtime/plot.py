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
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
