"""``python -m runtime.eval --rescore FILE ...``: score saved outputs again, without a model.

Reads this project's ``samples.jsonl`` (records carry ``problem_type``, ``solution``, ``text`` and, for the
lenient protocol, ``options`` and ``answer``) and Video-R1's own output files (``{"results": [{"problem_type",
"solution", "output", ...}], ...}``), so that the scorer can be checked against Video-R1's and old runs
rescored after a scorer change. Rewards are per row in file order; ``acc`` is the mean over rows that are not
regression and ``mra`` the mean over regression rows (as fractions, like the script's ``mean_acc`` and
``mean_mra``; null where a file has no such row); a samples.jsonl whose records name several methods is also
reported per method.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import InputError
from runtime.answer import extract_answer
from runtime.eval import protocol as proto
from runtime.eval.data import json_lines


def read_rows(path: Path) -> list[dict]:
    """Rows with ``problem_type``, ``solution``, ``output`` (and ``options``) from either format."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL: one record a line
    if isinstance(whole, dict) and "results" in whole:  # Video-R1's output file
        rows, out_key = whole["results"], "output"
        if not isinstance(rows, list):
            raise InputError(f"{path}: \"results\" is not a list")
    elif isinstance(whole, (dict, list)):
        rows = whole if isinstance(whole, list) else [whole]
        out_key = "output" if rows and isinstance(rows[0], dict) and "output" in rows[0] else "text"
    else:
        numbered = json_lines(text, f"{path} is neither a Video-R1 output file nor a samples.jsonl")
        lines, rows = [n for n, _ in numbered], [row for _, row in numbered]
        out_key = "text"
    where = (lambda i: f"line {lines[i]}") if out_key == "text" and not isinstance(whole, (dict, list)) \
        else (lambda i: f"row {i}")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"{path}: {where(i)} is not a JSON object")
        missing = [k for k in ("problem_type", "solution", out_key) if k not in r]
        if missing:
            hint = " (records written before the solution was recorded: rerun the evaluation)" \
                if out_key == "text" and "solution" in missing else ""
            raise InputError(f"{path}: {where(i)} lacks {', '.join(missing)}{hint}")
        out.append({"problem_type": r["problem_type"], "solution": r["solution"], "output": r[out_key] or "",
                    "options": r.get("options") or [], "method": r.get("method")})
    return out


def _summary(rows: list[dict], rewards: list[float]) -> dict:
    acc = [x for x, r in zip(rewards, rows) if r["problem_type"] != "regression"]
    mra = [x for x, r in zip(rewards, rows) if r["problem_type"] == "regression"]
    return {"rewards": rewards, "acc": sum(acc) / len(acc) if acc else None,
            "mra": sum(mra) / len(mra) if mra else None, "n": len(rows)}


def rescore(path: Path, protocol: str) -> dict:
    """The file's rewards, ``acc`` and ``mra``; with ``methods`` (the same per method) where its records name
    more than one method (a samples.jsonl of a run comparing methods)."""
    rows = read_rows(path)
    rewards = [proto.score(protocol, r["problem_type"], r["output"], extract_answer(r["output"]), r["solution"],
                           r["options"])[1] for r in rows]
    out = {"path": str(path), **_summary(rows, rewards)}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] is not None))
    if len(methods) > 1:
        out["methods"] = {}
        for m in methods:
            pick = [i for i, r in enumerate(rows) if r["method"] == m]
            out["methods"][m] = _summary([rows[i] for i in pick], [rewards[i] for i in pick])
    return out


def rescore_files(paths: list[Path], protocol: str, as_json: bool) -> dict:
    if protocol not in proto.PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(proto.PROTOCOLS)}")
    report = {"protocol": protocol, "files": [rescore(p, protocol) for p in paths]}
    if as_json:
        print(json.dumps({"files": report["files"]}))
    else:
        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}"

        print(f"| file | method | rows | acc | mra |  (protocol {protocol})\n|---|---|---|---|---|")
        for f in report["files"]:
            for m, part in (f.get("methods") or {"all": f}).items():
                print(f"| {f['path']} | {m} | {part['n']} | {pct(part['acc'])} | {pct(part['mra'])} |")
    return report
