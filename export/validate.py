"""ONNX Runtime against the PyTorch modules on fixed inputs; one table, one error listing every failure.

Cases: the trunk at the prefill shape (P = 0, S > 1), the decode shape (S = 1, P > 0), P = 0 with S = 1,
a static decode step (a fixed-capacity past, partly filled: cache_length < P) and a step of three rows of
different lengths in one call (a batch of requests: cache_length per row); the vision encoder
at grids other than the export example (so dynamic axes are exercised).
An output passes when max|onnx - torch| <= atol + rtol * max|torch| (tolerances per precision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.manifest import ExportError
from export.sessions import ort_session
from models.registry import family

TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 1e-2), "bf16": (1e-1, 2e-2)}  # (atol, rtol)


@dataclass
class Row:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    tolerance: float
    ok: bool


def trunk_cases(model, dtype, seed: int = 0) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    t = model.cfg.text
    g = torch.Generator().manual_seed(seed)
    scale = float(model.decoder.embed_tokens.weight.float().std())
    cases = []
    # (label, S, P, cache_length per row): "static" is a static decode step, a fixed-capacity past of which only the
    # first entries are filled (the rest random: they must not matter); "rows" three requests' decode steps in one
    # call, each row's past filled to its own length
    for label, s, p, n in (("prefill P=0 S=7", 7, 0, (0,)), ("decode S=1 P=9", 1, 9, (9,)), ("P=0 S=1", 1, 0, (0,)),
                           ("static S=1 P=12 L=9", 1, 12, (9,)), ("rows B=3 P=12 L=9,4,12", 1, 12, (9, 4, 12))):
        b = len(n)
        embeds = torch.randn(b, s, t.hidden_size, generator=g) * scale
        pos = (torch.arange(s).view(1, s) + torch.tensor(n).view(b, 1)).view(1, b, s).expand(3, b, s).contiguous()
        # DeepStack features (families that have them): nonzero at the prefill's first tokens, zero elsewhere
        levels = getattr(t, "deepstack_layers", 0)
        deepstack = torch.randn(levels, b, s, t.hidden_size, generator=g) * scale
        deepstack[:, :, s // 2 + 1:] = 0
        extra = (deepstack.to(dtype),) if levels else ()
        past = [torch.randn(b, p, t.num_key_value_heads, t.head_dim, generator=g)
                for _ in range(2 * model.trunk.num_layers)]
        cases.append((label, (embeds.to(dtype), pos, torch.tensor(n), *extra, *(x.to(dtype) for x in past))))
    return cases


def vision_cases(model, dtype, seed: int = 0) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    v = model.cfg.vision
    g = torch.Generator().manual_seed(seed)
    cases = []
    for grid in ((1, 4, 6), (3, 8, 8)):
        n = grid[0] * grid[1] * grid[2]
        pv = torch.randn(n, v.patch_dim, generator=g).to(dtype)
        cases.append((f"grid {grid}", (pv, *family(model.cfg.model_type).vision_inputs(grid, v).values())))
    return cases


def compare(graph: str, path: Path, module, cases, names: list[str], precision: str) -> list[Row]:
    atol, rtol = TOLERANCE[precision]
    sess = ort_session(path, exact=True)
    out_names = [o.name for o in sess.get_outputs()]
    rows = []
    for label, args in cases:
        with torch.no_grad():
            want = module(*args)
        want = want if isinstance(want, tuple) else (want,)
        feed = {n: a.detach().cpu().float().numpy() if a.dtype == torch.bfloat16 else a.detach().cpu().numpy()
                for n, a in zip(names, args)}
        got = sess.run(None, feed)
        for name, g, w in zip(out_names, got, want):
            w = w.detach().float().cpu().numpy()
            g = np.asarray(g, dtype=np.float32)
            diff = float(np.abs(g - w).max()) if w.size else 0.0
            tol = atol + rtol * (float(np.abs(w).max()) if w.size else 0.0)
            rows.append(Row(graph, label, name, diff, tol, bool(diff <= tol and np.isfinite(g).all())))
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'graph':<7} {'case':<22} {'output':<10} {'max abs diff':>13} {'tolerance':>11}  result"]
    for r in rows:
        lines.append(f"{r.graph:<7} {r.case:<22} {r.output:<10} {r.max_abs_diff:>13.3e} {r.tolerance:>11.3e}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def validate_export(model, out_dir: Path, precision: str, trunk_names: list[str], vision_names: list[str]) -> dict:
    """Run every case; returns the report stored in the manifest, raises listing every failing output."""
    if precision == "bf16":
        return {"status": "skipped", "reason": "ONNX Runtime has no CPU kernels for bf16 graphs; "
                "validate a bf16 export on the TensorRT engine or export fp16/fp32 to validate here",
                "rows": []}
    dtype = next(model.parameters()).dtype
    graph = family(model.cfg.model_type).TrunkGraph

    rows = compare("trunk", out_dir / "trunk.onnx", graph(model.trunk), trunk_cases(model, dtype), trunk_names,
                   precision)
    rows += compare("vision", out_dir / "vision.onnx", model.visual, vision_cases(model, dtype), vision_names,
                    precision)
    failing = [r for r in rows if not r.ok]
    report = {"status": "passed" if not failing else "failed", "tolerance": dict(zip(("atol", "rtol"),
              TOLERANCE[precision])), "rows": [asdict(r) for r in rows], "table": table(rows)}
    if failing:
        listed = "; ".join(f"{r.graph}/{r.case}/{r.output}: {r.max_abs_diff:.3e} > {r.tolerance:.3e}"
                           for r in failing)
        raise ExportError(f"validation failed for {len(failing)} output(s): {listed}")
    return report
