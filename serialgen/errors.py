"""The one exception type the command line turns into a one-line error (exit 2)."""

__all__ = ["SerialgenError", "UserInputError"]


class SerialgenError(Exception):
    """Base class for errors that reach the user as one line: what, where, and what is expected."""


class UserInputError(SerialgenError, ValueError):
    """Bad input from the user: a missing path, an invalid value, an empty manifest."""
