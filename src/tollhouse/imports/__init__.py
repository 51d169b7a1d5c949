"""The legacy users.csv backfill (seed 001's format): parse, validate, stage, apply, report."""

from tollhouse.imports.report import Issue
from tollhouse.imports.service import ImportService, ImportSummary

__all__ = ["ImportService", "ImportSummary", "Issue"]
