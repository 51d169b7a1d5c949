"""Stripe webhook signatures, checked on the raw bytes before anything parses them."""

from __future__ import annotations

import stripe

from tollhouse.errors import InvalidWebhookSignature


def _timestamp(header: str) -> int:
    """The `t=` of the header; the SDK would fail on a malformed one with a ValueError."""
    stamps = [item[2:] for item in header.split(",") if item.strip().startswith("t=")]
    if len(stamps) != 1 or not stamps[0].strip().isdigit():
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
