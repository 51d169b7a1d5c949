from pathlib import Path

import pytest

from tollhouse.errors import ConfigurationError
from tollhouse.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "TOLLHOUSE_DATABASE_URL", "TOLLHOUSE_PORT", "TOLLHOUSE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOLLHOUSE_ENV_FILE", str(tmp_path / ".env"))


def test_defaults_use_the_embedded_database() -> None:
    settings = load_settings()
    assert settings.embedded
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.pgdata == settings.data_dir / "pgdata"


def test_database_url_and_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("TOLLHOUSE_PORT", "9001")
    settings = load_settings()
    assert not settings.embedded
    assert settings.database_url == "postgresql://u@db/x"
    assert settings.port == 9001


def test_env_file_is_read_and_explicit_values_win(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TOLLHOUSE_PORT=7000\nTOLLHOUSE_HOST=0.0.0.0\n")
    settings = load_settings(port=7100)
    assert settings.host == "0.0.0.0"
    assert settings.port == 7100


def test_malformed_env_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TOLLHOUSE_PORT=7000\nthis is not a setting\n")
    with pytest.raises(ConfigurationError, match=r"malformed .*\.env at line 2"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("TOLLHOUSE_PORT", "eighty", "port"),
        ("TOLLHOUSE_PORT", "70000", "port"),
        ("TOLLHOUSE_LOG_FORMAT", "xml", "log_format"),
    ],
)
def test_invalid_values_are_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, setting: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"invalid setting {setting}"):
        load_settings()


def test_pool_bounds_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLHOUSE_POOL_MIN_SIZE", "20")
    monkeypatch.setenv("TOLLHOUSE_POOL_MAX_SIZE", "5")
    with pytest.raises(ConfigurationError, match="pool_min_size"):
        load_settings()


def test_the_readme_lists_every_setting() -> None:
    from tollhouse.settings import Settings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [
        name
        for name in Settings.model_fields
        if name != "database_url" and f"TOLLHOUSE_{name.upper()}" not in readme
    ]
    assert "`DATABASE_URL`" in readme
    assert missing == []
