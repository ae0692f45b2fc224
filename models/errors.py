"""The project's own exceptions: errors a user can cause, each with a message that says what to do.

Every package raises these (never bare ValueError for user mistakes) so that the CLIs can print one
line and exit 1, and API callers can catch one base class.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of every error a user can cause (bad path, bad input, wrong engine, ...)."""


class CheckpointError(UserError):
    """The checkpoint directory is missing, incomplete, unsafe or of an unsupported architecture."""


class InputError(UserError):
    """A video, image, frame list or question cannot be used as given."""


class ResourceError(UserError):
    """A request does not fit the device's memory; what it allocated has been released."""


def run_cli(fn, args, interrupted: str = "interrupted") -> int:
    """Run a CLI's typed function: a UserError becomes one ``error: ...`` line on stderr and exit code 1
    (``args.debug`` re-raises it with its traceback); Ctrl-C prints ``interrupted`` and exits 130."""
    import sys

    try:
        return fn(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
