"""What PostgreSQL cannot store, found before a write instead of as an error after it.

`text` and `jsonb` refuse a NUL character and a lone UTF-16 surrogate (Python's JSON reader
accepts `"\\ud800"`), and `jsonb` refuses NaN and the infinities (Python's reader accepts
`NaN` and `Infinity`). A value carrying one would fail inside the write as a 500; the edges
call this to answer 422 instead. A value nested deeper than `MAX_DEPTH` is refused too.
"""

from __future__ import annotations

import math
from typing import Any

#: How deep a JSON value may nest (objects and arrays). Deeper ones are refused: Python's
#: recursion limit would otherwise decide, at a depth that depends on the caller's stack.
MAX_DEPTH = 64


def unstorable(value: Any, _depth: int = 0) -> str | None:
    """Why `value` (a JSON-like tree) cannot be stored, or None when it can."""
    if isinstance(value, str):
        if "\x00" in value:
            return "text may not contain NUL characters"
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return "text may not contain lone surrogates"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "numbers must be finite (no NaN or Infinity)"
    if isinstance(value, dict | list | tuple) and _depth >= MAX_DEPTH:
        return f"JSON may nest at most {MAX_DEPTH} levels deep"
    if isinstance(value, dict):
        for k, v in value.items():
            reason = unstorable(k, _depth + 1) or unstorable(v, _depth + 1)
            if reason:
                return reason
        return None
    if isinstance(value, list | tuple):
        for v in value:
            reason = unstorable(v, _depth + 1)
            if reason:
                return reason
    return None
