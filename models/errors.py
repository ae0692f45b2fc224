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


class SourceError(UserError):
    """A live video source could not be opened or kept open (``runtime.watch``)."""


def run_cli(fn, args, interrupted: str = "interrupted") -> int:
    """Run a CLI's typed function: a UserError becomes one ``error: ...`` line on stderr and exit code 1; any
    other exception one ``internal error: <type>: <message>`` line and exit code 2 (a bug, or a failure this
    project does not name yet); ``args.debug`` re-raises either with its traceback. Ctrl-C prints
    ``interrupted`` and exits 130."""
    import sys

    try:
        return fn(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (the last line of defence: no traceback unless asked for)
        if getattr(args, "debug", False):
            raise
        print(f"internal error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 2


def one_line(e: BaseException, limit: int = 2000) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
