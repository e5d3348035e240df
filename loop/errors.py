"""The one exception a user should ever see from the loop.

A `LoopError` carries a single line that names the problem and the fix. The CLI prints it as
`error: <message>` and exits with status 2, without a traceback; the library raises it so that callers can
catch it (it subclasses ValueError, which is what Trainer raises for the same mistakes).
"""

from __future__ import annotations

import difflib


class LoopError(ValueError):
    """A problem with the user's input, explained in one line."""


def closest(name: str, choices) -> str:
    """' (did you mean `x`?)' for the nearest valid name, or '' if nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
