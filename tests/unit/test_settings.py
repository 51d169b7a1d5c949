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


def test_webhook_lanes_default_to_two_and_go_into_the_billing_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tollhouse.app import billing_config
    from tollhouse.billing import BillingConfig

    assert billing_config(load_settings()).lanes == 2 == BillingConfig().lanes
    monkeypatch.setenv("TOLLHOUSE_STRIPE_WEBHOOK_LANES", "7")
    assert billing_config(load_settings()).lanes == 7
    monkeypatch.setenv("TOLLHOUSE_STRIPE_WEBHOOK_LANES", "0")
    with pytest.raises(ConfigurationError, match="stripe_webhook_lanes"):
        load_settings()


def test_log_lines_below_the_level_are_dropped_before_any_processing() -> None:
    """At `warning`, an info line (every request's access line) is dropped by the first
    processor, before time stamps and rendering; warnings still print."""
    import subprocess
    import sys

    script = (
        "import structlog\n"
        "from tollhouse.observability import configure_logging\n"
        "configure_logging('warning')\n"
        "assert structlog.get_config()['processors'][0] is structlog.stdlib.filter_by_level\n"
        "log = structlog.get_logger('tollhouse.http')\n"
        "log.info('quiet')\n"
        "log.warning('loud')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "loud" in done.stderr and "quiet" not in done.stderr
