"""Health: readiness for load balancers, and the `doctor` checks for operators."""

from tollhouse.health.service import Check, HealthService, Readiness

__all__ = ["Check", "HealthService", "Readiness"]
