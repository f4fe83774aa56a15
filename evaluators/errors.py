"""The error users see: one line saying what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user (unknown model, unreadable dataset, impossible budget...).

    The CLI prints its message on one line and exits non-zero; the HTTP service
    answers 4xx with it. Anything else escaping is a bug and keeps its traceback.
    """
