import inspect

import pytest

from tollhouse import errors
from tollhouse.api.errors import STATUS, status_for


def _leaves() -> list[type[errors.TollhouseError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.TollhouseError)
    ]


def test_every_error_has_its_own_code_and_a_docstring() -> None:
    classes = _leaves()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two error classes share a code"
    for cls in classes:
        assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no default message"


def test_default_message_is_the_docstring_and_fields_are_kept() -> None:
    exc = errors.ApiKeyNotFound(key="abc")
    assert exc.message == "No such service API key."
    assert exc.fields == {"key": "abc"}
    assert repr(exc) == "ApiKeyNotFound('No such service API key.', key='abc')"


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.ApiKeyNotFound(), 404),  # inherits NotFound's line
        (errors.ApiKeyNameTaken(), 409),  # inherits UniqueViolation's line
        (errors.Unauthenticated(), 401),
        (errors.DatabaseUnavailable(), 503),
        (errors.MigrationChecksumMismatch(), 503),
        (errors.SerializationRetriesExhausted(), 503),
        (errors.TollhouseError(), 500),
    ],
)
def test_status_table_follows_the_class_tree(exc: errors.TollhouseError, status: int) -> None:
    assert status_for(exc) == status


def test_every_status_in_the_table_is_an_http_error() -> None:
    assert all(400 <= status < 600 for status in STATUS.values())


def test_json_nested_deeper_than_the_limit_is_unstorable() -> None:
    """A fixed depth decides, not Python's recursion limit (which depends on the stack)."""
    from tollhouse.db.values import MAX_DEPTH, unstorable

    def nested(depth: int) -> object:
        value: object = 1
        for n in range(depth):
            value = [value] if n % 2 else {"k": value}
        return value

    assert unstorable(nested(MAX_DEPTH)) is None
    assert unstorable(nested(MAX_DEPTH + 1)) == f"JSON may nest at most {MAX_DEPTH} levels deep"
    assert unstorable(nested(5000)) is not None
