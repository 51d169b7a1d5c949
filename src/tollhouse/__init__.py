"""Tollhouse: a self-hostable backend for a SaaS or AI product's users and money."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tollhouse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
