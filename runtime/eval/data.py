"""Evaluation files: a JSON list or JSONL of samples (problem, options, solution, path, problem_type,
data_type). Paths are resolved under --video-root and may not escape it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import InputError

REQUIRED = ("problem", "solution", "path", "problem_type", "data_type")


@dataclass
class Sample:
    dataset: str
    id: str
    problem: str
    problem_type: str
    data_type: str
    path: str
    solution: str
    options: list[str] = field(default_factory=list)
    index: int = 0  # position in its file: what a record is keyed by (ids may repeat, and every row counts)


def json_lines(text: str, what: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of JSONL ``text``; a line that is not JSON is one error:
    ``what``, then the file's own line number."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{what}: line {n} is not JSON ({e.msg} at column {e.colno})") from None
    return out


def load_samples(path: str | Path, dataset: str | None = None) -> list[Sample]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"evaluation file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"evaluation file {p} is not UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"evaluation file {p} is not a valid JSON list ({e})") from None
    else:
        rows = [row for _, row in json_lines(text, f"evaluation file {p} is neither a JSON list nor JSONL")]
    name = dataset or p.stem
    if not isinstance(rows, list):
        raise InputError(f"evaluation file {p} holds a JSON {type(rows).__name__}, not a list of samples")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{p}: sample {i} is not a JSON object")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise InputError(f"{p}: sample {i} lacks {', '.join(missing)}")
        out.append(Sample(dataset=name, id=str(row.get("problem_id", i)), problem=row["problem"],
                          problem_type=row["problem_type"], data_type=row["data_type"], path=row["path"],
                          solution=row["solution"], options=list(row.get("options") or []), index=i))
    return out


def resolve_media(root: str | Path, relative: str) -> Path:
    """``relative`` under ``root``; a path that would leave the root (.., absolute, symlink) is refused."""
    base = Path(root).expanduser().resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InputError(f"sample path {relative!r} leaves --video-root {base}; refused")
    return target
