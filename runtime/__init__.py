"""The runtime: backends, KV cache, decode loop, the ``Reasoner`` API, CLI, plots.

``import runtime`` works on a CPU-only machine without tensorrt or matplotlib; they are imported where used.
The error classes an app catches are here too: ``UserError`` (the base of every error a user can cause) and its
kinds ``InputError``, ``CheckpointError``, ``ExportError``, ``ResourceError``, ``SourceError``; and ``Closed``, a
request stopped by ``Reasoner.close`` (not a user error: the answer is incomplete).

The project's top-level packages are ``models``, ``export``, ``controller`` and ``runtime``. An app with a
package of one of those names that comes first on ``sys.path`` would shadow this project's; that is detected
here, before anything is imported from them, and said in one line (``ImportError``) with the way out.
"""

from __future__ import annotations

OWN_PACKAGES = ("models", "export", "controller")


def _check_own_packages() -> None:
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent  # where this installation's packages lie
    for name in OWN_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:
            where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
        else:
            spec = importlib.util.find_spec(name)
            where = None if spec is None else spec.origin or next(iter(spec.submodule_search_locations or []), None)
        if where is None or where in ("namespace", "built-in"):
            found = None
        else:
            found = Path(where).resolve()
            found = found.parent if found.name == "__init__.py" else found
        if found != root / name:
            raise ImportError(
                f"the package '{name}' Python finds ({found or 'none'}) is not vreason-edge's ({root / name}): an "
                f"app's own '{name}' package shadows it. Rename the app's package, or put the app's folder after "
                "site-packages on sys.path (vreason-edge's top-level packages: models, export, controller, runtime)")


_check_own_packages()

from export.manifest import ExportError  # noqa: E402  (after the check: these import the packages it checks)
from models.errors import CheckpointError, InputError, ResourceError, SourceError, UserError  # noqa: E402
from runtime.engine import Closed  # noqa: E402
from runtime.reasoner import Reasoner, Result  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402

__all__ = ["Reasoner", "Result", "SamplingParams", "UserError", "InputError", "CheckpointError", "ExportError",
           "ResourceError", "SourceError", "Closed"]
