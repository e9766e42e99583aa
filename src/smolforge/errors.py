"""One exception type for every user-facing error.

DESIGN.md principle 3 ("Nothing silent"): bad input gets a one-paragraph message naming the
file, line, key or field and what to do. The CLI prints `SmolforgeError` without a traceback and
exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SmolforgeError(Exception):
    """An error caused by the user's input (a file, a recipe key, a flag), not by a bug."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `file:line field 'x'` for error messages."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f" field '{field}'"
    return text
