"""The one exception type that ends a run with a one-line message instead of a traceback, and the one way a
message quotes the error that caused it."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message (a cause quoted inside a one-line message), or its type's name where it
    has none."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
