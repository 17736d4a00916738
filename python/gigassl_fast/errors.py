"""User-facing errors.

Anything the user can fix (a path, an option, a slide) raises ``GigasslError`` with one line that
names the file or option and the fix. The CLI prints that line and never a traceback; a cohort run
records it per slide and goes on.
"""

from __future__ import annotations


class GigasslError(Exception):
    """A problem with the user's input; ``str(err)`` is a one-line message naming the fix."""


class SlideError(GigasslError):
    """A slide that cannot be used; the message starts with the slide's path."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
