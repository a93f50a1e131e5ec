"""The one exception type that ends a run with a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

