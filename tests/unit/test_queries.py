from importlib import resources

import pytest

from tollhouse.db.queries import Queries, parse_queries


def test_parse_splits_named_queries_and_keeps_comments() -> None:
    text = "-- file header\n\n-- name: one\n-- why\nSELECT 1\n\n-- name: two\nSELECT 2;\n"
    queries = parse_queries(text)
    assert queries == {"one": "-- why\nSELECT 1", "two": "SELECT 2;"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", "defined twice"),
        ("-- name: a\n\n-- name: b\nSELECT 2", "empty"),
        ("SELECT 0;\n-- name: a\nSELECT 1", "before the first"),
    ],
)
def test_parse_refuses_malformed_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_queries(text)


def test_unknown_query_name_says_which_file() -> None:
    queries = Queries("tollhouse.keys", "queries.sql")
    with pytest.raises(KeyError, match=r"no query 'nope' in tollhouse\.keys/queries\.sql"):
        queries["nope"]


def _sql_files() -> list[tuple[str, str]]:
    root = resources.files("tollhouse")
    found = []
    stack = [("tollhouse", root)]
    while stack:
        package, folder = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir() and (entry / "__init__.py").is_file():
                stack.append((f"{package}.{entry.name}", entry))
            elif entry.name.endswith(".sql") and package != "tollhouse.db.migrations":
                found.append((package, entry.name))
    return sorted(found)


@pytest.mark.parametrize(("package", "filename"), _sql_files())
def test_every_query_file_in_the_package_parses(package: str, filename: str) -> None:
    names = Queries(package, filename).names()
    assert names, f"{package}/{filename} has no queries"
