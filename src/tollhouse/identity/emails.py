"""E-mail addresses: normalised (trimmed, lower-cased) and checked at the edge.

Dots and `+tags` are kept: `alice+1@x.com` is another mailbox than `alice@x.com`. Addresses
are ASCII, checked before lower-casing: Unicode's lower case of the Kelvin sign (U+212A) is
an ASCII `k`, so `\u212aelly@x.com` would otherwise become `kelly@x.com`, and a reset asked for
the look-alike spelling would reach an account whose mail the app sends elsewhere.
"""

from __future__ import annotations

import re

from tollhouse.errors import InvalidEmail

_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_EMAIL = re.compile(rf"^{_LOCAL}@(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})$")


def normalise_email(raw: str) -> str:
    """The stored form of an address, or `InvalidEmail`."""
    email = raw.strip()
    if len(email) > 254 or "@" not in email or not email.isascii():
        raise InvalidEmail(f"{_shown(raw)} is not a valid e-mail address", field="email")
    email = email.lower()
    local = email.rsplit("@", 1)[0]
    if len(local) > 64 or not _EMAIL.fullmatch(email):
        raise InvalidEmail(f"{_shown(raw)} is not a valid e-mail address", field="email")
    return email


def provider_email(raw: str | None) -> str | None:
    """An address a provider sent, normalised; None when it sent none or not a valid one."""
    if raw is None:
        return None
    try:
        return normalise_email(raw)
    except InvalidEmail:
        return None


def _shown(raw: str) -> str:
    return repr(raw[:80] + ("…" if len(raw) > 80 else ""))
