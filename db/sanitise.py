"""Text that goes into the database's reasons and ``cxr-worker status``/``history`` output.

Error text often comes from a library's exception, which may quote a value it choked on (a
patient's name in a malformed element, a path). :func:`clean_error` keeps the message's shape and
drops what it quoted; :func:`escape_control` makes any text one printable line (no forged lines).
"""

from __future__ import annotations

import re

#: A quoted value in an exception message: '...' or "..." (repr style), at most one line long.
_QUOTED = re.compile(r"""(?P<q>['"])(?:(?!(?P=q)).){1,200}(?P=q)""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
ERROR_LIMIT = 500


def escape_control(text: str) -> str:
    r"""``text`` with every control character written as an escape (``\n``, ``\x1b``...)."""

    def esc(m: re.Match[str]) -> str:
        ch = m.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{ord(ch):02x}")

    return _CONTROL.sub(esc, text)


def clean_error(text: str, limit: int = ERROR_LIMIT) -> str:
    """An error message fit for the database and ``status``: quoted values replaced by
    ``'…'``, control characters escaped, at most ``limit`` characters."""
    out = escape_control(_QUOTED.sub(lambda m: f"{m.group('q')}…{m.group('q')}", text.strip()))
    return out if len(out) <= limit else out[: limit - 1] + "…"
