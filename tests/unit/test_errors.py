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
