"""A fake Google / Apple: key sets the tests generate, served on 127.0.0.1, and a signer
for ID tokens with any claim the tests need to get wrong."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

GOOGLE_CLIENT = "google-client-test.apps.example"
APPLE_CLIENT = "com.example.tollhouse.test"
GOOGLE_ISSUER = "https://accounts.google.com"
APPLE_ISSUER = "https://appleid.apple.com"


@dataclass
class KeySet:
    """Signing keys by kid, and the JWKS document that publishes their public halves."""

    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    rsa_kid: str = "rsa-1"
    ec_kid: str = "ec-1"

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec_key.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": self.rsa_kid, "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": self.ec_kid, "alg": "ES256", "use": "sig"},
            ]
        }


class _Handler(BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        return None


@contextmanager
def serve_jwks(keys: KeySet) -> Iterator[str]:
    """Serve the key set on a free loopback port; yield its URL."""
    with serve_rotating_jwks(keys) as (url, _):
        yield url


@contextmanager
def serve_rotating_jwks(keys: KeySet) -> Iterator[tuple[str, Callable[[KeySet], None]]]:
    """Serve the key set; yield its URL and a function that publishes another set instead
    (the provider rotating or withdrawing keys)."""
    handler: type[_Handler] = type(
        "JwksHandler", (_Handler,), {"body": json.dumps(keys.jwks()).encode()}
    )

    def publish(new: KeySet) -> None:
        handler.body = json.dumps(new.jwks()).encode()

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/keys", publish
    finally:
        server.shutdown()
        server.server_close()


def claims(provider: str, subject: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Valid claims for a provider; override or drop (value None) any of them."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": GOOGLE_ISSUER if provider == "google" else APPLE_ISSUER,
        "aud": GOOGLE_CLIENT if provider == "google" else APPLE_CLIENT,
        "sub": subject or f"{provider}-{uuid.uuid4().hex}",
        "iat": now,
        "exp": now + 600,
    }
    if provider == "apple":
        base["nonce"] = "n-" + uuid.uuid4().hex
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    keys: KeySet,
    payload: dict[str, Any],
    *,
    alg: str = "RS256",
    kid: str | None = None,
    key: Any = None,
) -> str:
    """An ID token; by default RS256 with the published RSA key."""
    if key is None:
        key = keys.ec_key if alg == "ES256" else keys.rsa_key
    if kid is None:
        kid = keys.ec_kid if alg == "ES256" else keys.rsa_kid
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})
