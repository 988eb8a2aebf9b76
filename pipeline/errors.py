"""The base of every error that svp explains to its user in one message."""

from __future__ import annotations


class SvpError(Exception):
    """A failure that is the user's to fix: bad input or options, a refused configuration, data, a
    checkpoint or a store that cannot be used. Its message says what and where; ``jobs.entry``
    prints it as ``svp COMMAND: error: MESSAGE`` and exits with status 2. Any other exception is a
    bug in svp, and keeps its traceback."""
