"""Checks of values a user gives, shared by every command and the Python API: numeric ranges (NaN and inf
included), devices, and paths to read or write. Each failure is the project's own error with one line that
names the option and what it accepts. The dataclasses that hold settings call these in their validation,
so the CLI (which fills the dataclasses) and the API check the same way, in one place.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from models.errors import InputError, UserError


def check_number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, optional: bool = False):
    """``value`` if it is a finite number (an int with ``integer``) within the bounds, else InputError."""
    if value is None and optional:
        return value
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
    want = ("an integer" if integer else "a number") + (f" {lo_s}" if lo_s else "") + \
        (" and" if lo_s and hi_s else "") + (f" {hi_s}" if hi_s else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise InputError(f"{name} must be {want}, got {value!r}")
    return int(value) if integer else value


def check_device(name: str | None, option: str = "--device") -> str:
    """A device string torch understands and this machine has: cpu, cuda or cuda:N."""
    import torch

    if name is None:
        return "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{option} {name!r} is not a device; use cpu or cuda (cuda:N for another GPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{option} {name!r} is not supported; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name} requested but no CUDA GPU is visible to PyTorch (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def input_file(path, option: str) -> Path:
    """An existing, readable regular file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{option} {p} does not exist")
    if p.is_dir():
        raise InputError(f"{option} {p} is a folder; give a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{option} {p} is not readable")
    return p


def input_dir(path, option: str) -> Path:
    """An existing, readable folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{option} {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{option} {p} is not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise InputError(f"{option} {p} is not readable")
    return p


def output_file(path, option: str, suffix: str | None = None) -> Path:
    """A file that can be written: not a folder, in an existing writable folder (created if its parent is)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{option} {p} is a folder; give a file name")
    if suffix and p.suffix.lower() != suffix:
        raise InputError(f"{option} {p} must end in {suffix}")
    writable_dir(p.parent if str(p.parent) else Path("."), option, of=p)
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{option} {p} exists and is not writable")
    return p


def writable_dir(path, option: str, of: Path | None = None) -> Path:
    """A folder that exists and is writable, or can be created (its nearest existing ancestor is writable)."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    what = f"{option} {of or p}"
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{what}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {probe} is not writable")
    return p


def plotting_available(option: str = "--plot") -> None:
    """matplotlib importable (checked before any compute, so a plot never fails after the work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"{option} needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the text already says it or there is none.

    Hand-written beside argparse's ``ArgumentDefaultsHelpFormatter`` because that one appends "(default: None)"
    and "(default: False)" to every unset option and flag (about half of ``python -m runtime --help``'s lines),
    and repeats defaults the help text already states."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS \
                or default == [] or action.option_strings == ["-h", "--help"]:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default {shown})" if text else f"(default {shown})"


def description(doc: str) -> str:
    """A command's description: its module docstring's first paragraph, whole."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def plain_name(name: object) -> bool:
    """A file name a folder of ours may list or name (an export's manifest, a checkpoint's shard index): one
    relative path component; no folders, '..', absolute or home paths, drive letters or NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not name.startswith("~") and ":" not in name)


def read_json_object(path: Path, error: type[UserError] = InputError, hint: str = "") -> dict:
    """A JSON file that holds an object; invalid JSON or another JSON value is one ``error`` naming the file
    (``hint``: what to do, appended)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object{hint}")
    return data


CONFIG_INT_CEILING = 1 << 24  # no dimension, count or token id of a supported model comes near it (vocab ~152k)
_MAY_BE_ZERO = ("deepstack", "fullatt", "index", "token_id", "tie")


def check_config_numbers(cfg, where: str = "config") -> None:
    """Every number of a model config dataclass (and its lists) has the right type and a sane range: integers
    in [1, 2^24] (0 allowed for ids and indexes), floats finite. Checked before any size is used to allocate."""
    import dataclasses

    from models.errors import CheckpointError

    def bad(name, v, want):
        raise CheckpointError(f"{where}: {name} must be {want}, got {v!r}")

    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lo = 0 if any(k in f.name for k in _MAY_BE_ZERO) else 1
        values = v if isinstance(v, list) and kind.startswith("list") else [v]
        if kind in ("int", "list[int]"):
            for x in values:
                if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= CONFIG_INT_CEILING:
                    bad(f.name, v, f"an integer in [{lo}, {CONFIG_INT_CEILING}]")
        elif kind in ("float", "list[float]"):
            for x in values:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                    bad(f.name, v, "a finite number")
        elif kind == "bool" and not isinstance(v, bool):
            bad(f.name, v, "true or false")


def device_memory(device) -> int | None:
    """Total memory of the device (CUDA: the GPU's; CPU: physical RAM); None when unknown."""
    import torch

    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev).total_memory)
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def available_memory(device) -> int | None:
    """Memory a new allocation can take now (CUDA: free plus what PyTorch holds cached; CPU: available RAM)."""
    import torch

    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
            return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        return _meminfo("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def process_memory(field: str = "VmRSS") -> int:
    """The process's memory from /proc/self/status (Linux): ``VmRSS`` now, ``VmHWM`` its peak; elsewhere the
    peak resident set from getrusage."""
    found = _proc_kib("/proc/self/status", field)
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (Linux), else None."""
    return _proc_kib("/proc/meminfo", field)


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a /proc file, in bytes; None where there is none."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
