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
