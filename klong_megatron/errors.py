"""Project-wide error base: :class:`UserError` marks a mistake in what the user gave (file, field, flag).

CLIs print a ``UserError`` as one line and exit 2 even inside a long run (``klong_megatron.cli._errors``);
any other exception there is a bug and keeps its traceback. Pure module: imports nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input; the message names what is wrong and where (``file:line: field ...``)."""
