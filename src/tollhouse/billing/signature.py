"""Stripe webhook signatures, checked on the raw bytes before anything parses them."""

from __future__ import annotations

import stripe

from tollhouse.errors import InvalidWebhookSignature


def _timestamp(header: str) -> int:
    """The `t=` of the header; the SDK would fail on a malformed one with a ValueError."""
    stamps = [item[2:].strip() for item in header.split(",") if item.strip().startswith("t=")]
    # At most 15 ASCII digits: str.isdigit() also takes other scripts' digits and
    # superscripts, which int() refuses or reads as another number, and int() refuses a
    # number of more than 4,300 digits.
    if len(stamps) != 1 or not (
        stamps[0].isascii() and stamps[0].isdigit() and len(stamps[0]) <= 15
    ):
        raise InvalidWebhookSignature("the Stripe-Signature header has no valid t= timestamp")
    return int(stamps[0])


def verify(
    payload: bytes, header: str | None, secrets: tuple[str, ...], *, now: float, tolerance: int
) -> None:
    """Accept when any `v1` signature of the header matches any configured secret (two at
    once during a rotation) and the timestamp is within `tolerance` seconds of `now` in
    either direction (the SDK only rejects old ones). Raises `InvalidWebhookSignature`."""
    if not header:
        raise InvalidWebhookSignature("the Stripe-Signature header is missing")
    timestamp = _timestamp(header)
    if abs(now - timestamp) > tolerance:
        raise InvalidWebhookSignature(
            f"the signature's timestamp is more than {tolerance} s away from now"
        )
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=None)
        except (stripe.SignatureVerificationError, ValueError):
            continue
        return
    raise InvalidWebhookSignature("no v1 signature of the Stripe-Signature header matches")
