"""Storage URLs as they may be shown: the password never leaves the process.

A PostgreSQL URL carries its password (``postgresql+psycopg://user:secret@host/db``); every message,
log line, CLI line and API answer that names a storage goes through :func:`redact_url` (or
:func:`scrub`, for a text that may quote the URL, such as a driver's error).
"""

from __future__ import annotations

import re
from urllib.parse import quote

from sqlalchemy.engine import make_url

__all__ = ["redact_url", "scrub"]

_MASK = "***"
# scheme://user:password@ : what a URL that SQLAlchemy cannot parse may still hold.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]*)@")


def redact_url(url: str) -> str:
    """``url`` with its password masked (``postgresql+psycopg://user:***@host/db``); a URL without one
    is returned as it is. Works on text SQLAlchemy cannot parse too (masks what looks like a password)."""
    text = str(url)
    try:
        shown = make_url(text).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: mask by pattern
        return _USERINFO.sub(lambda m: f"{m['head']}{_MASK}@", text)
    return _USERINFO.sub(lambda m: f"{m['head']}{_MASK}@", shown)


def _passwords(url: str) -> list[str]:
    found = [m["password"] for m in _USERINFO.finditer(str(url)) if m["password"]]
    try:
        password = make_url(str(url)).password
    except Exception:
        password = None
    if password:
        found.append(str(password))
        found.append(quote(str(password), safe=""))  # as written in the URL
    # A password of one or two characters is not searched for alone: masking every "a" of a message would
    # hide the message and protect nothing (such a password falls to guessing anyway).
    return [p for p in found if len(p) >= 3 and p != _MASK]


def scrub(text: str, *urls: str) -> str:
    """``text`` with every one of ``urls`` (and its password, wherever it appears alone) redacted, and any
    other ``scheme://user:password@`` masked."""
    out = str(text)
    for url in urls:
        if url:
            out = out.replace(str(url), redact_url(url))
            for password in _passwords(url):
                out = out.replace(password, _MASK)
    return _USERINFO.sub(lambda m: f"{m['head']}{_MASK}@", out)
