from tollhouse.db.dsn import describe, redact, with_dbname
from tollhouse.ids import uuid7


def test_uuid7_has_version_7_and_sorts_by_creation() -> None:
    ids = [uuid7() for _ in range(20_000)]
    assert all(u.version == 7 and u.variant == "specified in RFC 4122" for u in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_redact_hides_the_password_only() -> None:
    shown = redact("postgresql://alice:s3cret@db.internal:5433/money")
    assert "s3cret" not in shown
    assert "alice" in shown and "db.internal" in shown and "5433" in shown


def test_describe_and_with_dbname() -> None:
    dsn = "postgresql://alice:pw@db:5433/money"
    assert describe(dsn) == "db:5433/money"
    assert "dbname=other" in with_dbname(dsn, "other")
