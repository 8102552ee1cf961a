"""The one exception type a user is meant to read.

Anything raised as :class:`UserError` is an expected failure (missing data, a bad flag, a
corrupt file): the command-line tools print its message on one line and exit non-zero,
without a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure whose message says what is wrong and how to fix it."""

    exit_code = 2
