"""config.toml: the shipped file runs as is; every bad input is one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlmguard.cli import main
from vlmguard.config import load_config, masked
from vlmguard.errors import ConfigError

from helpers import free_port, write_config

REPO = Path(__file__).resolve().parent.parent
CAMERA = '[[cameras]]\nid = "a"\nurl = "lavfi:testsrc2"\n'


def test_shipped_config_is_valid_with_demo_camera(monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    config = load_config(REPO / "config.toml")
    assert [c.id for c in config.cameras] == ["demo"]
    assert config.cameras[0].url.startswith("lavfi:")
    assert config.data_dir == REPO / "data"
    assert config.database_url == f"sqlite:///{REPO / 'data' / 'vlmguard.db'}"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert (config.storage.segment_seconds, config.storage.archive_seconds) == (2, 600)
    assert (config.analysis.workers, config.analysis.max_retries,
            config.analysis.lease_seconds) == (2, 3, 60)


def test_shipped_config_documents_every_key():
    """Every dataclass field appears as a key in the shipped file (it is the documentation)."""
    text = (REPO / "config.toml").read_text()
    config = load_config(REPO / "config.toml")
    for section, values in masked(config).items():
        rows = values if isinstance(values, list) else [values]
        if section == "providers":
            rows = list(values.values())
        for row in rows:
            for key in row:
                if (section, key) == ("alerts", "rules"):
                    continue  # [[alerts.rules]] tables, checked below
                assert f"\n{key} = " in text, f"{section}.{key} is not in config.toml"
    # Alert rule keys: the shipped file has no rule, only a commented example.
    import dataclasses
    from vlmguard.config import AlertRule
    assert "\n# [[alerts.rules]]\n" in text
    for field in dataclasses.fields(AlertRule):
        assert f"\n# {field.name} = " in text, f"alerts.rules.{field.name} is not in config.toml"
    # Every kind's keys, including those of kinds the shipped file only shows commented out.
    from vlmguard.vlm import registry
    for kind, cls in registry.kinds().items():
        for field in registry.plain(cls.Settings(kind=kind, model="m")):
            assert f"\n{field} = " in text or f"\n# {field} = " in text, \
                f"providers ({kind}).{field} is not in config.toml"


def test_state_directory_holds_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    config = load_config(REPO / "config.toml")
    assert config.data_dir == tmp_path / "state" / "data"


def test_relative_data_dir_hangs_off_config_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = write_config(tmp_path, '[storage]\ndata_dir = "store"\n' + CAMERA)
    assert load_config(path).data_dir == tmp_path / "store"


def test_config_is_frozen(tmp_path):
    config = load_config(write_config(tmp_path, CAMERA))
    with pytest.raises(Exception):
        config.server.port = 1


BAD_CONFIGS = [
    ('[[cameras]]\nid = "a"\nurl = "lavfi:x"\n[[cameras]]\nid = "b"\n',
     "cameras[1].url: required"),
    ('[[cameras]]\nurl = "lavfi:x"\n', "cameras[0].id: required"),
    ('[server]\nport = "8080"\n' + CAMERA, "server.port: must be an integer, got string"),
    ('[server]\nport = 70000\n' + CAMERA, "server.port: must be <= 65535, got 70000"),
    ('[server]\nport = 0\n' + CAMERA, "server.port: must be >= 1, got 0"),
    ('[analysis]\nworkers = true\n' + CAMERA, "analysis.workers: must be an integer, got boolean"),
    ('[analysis]\nworkers = -1\n' + CAMERA, "analysis.workers: must be >= 0, got -1"),
    ('[analysis]\nlease_seconds = 1\n' + CAMERA, "analysis.lease_seconds: must be >= 5, got 1"),
    ('[storage]\nmax_disk_gb = "lots"\n' + CAMERA, "storage.max_disk_gb: must be a number, got string"),
    ('[storage]\nsegment_seconds = 2.5\n' + CAMERA, "storage.segment_seconds: must be an integer, got float"),
    ('[server]\nhots = "x"\n' + CAMERA, "server.hots: unknown key"),
    ('[sever]\nhost = "x"\n' + CAMERA, "sever: unknown key"),
    ('server = 3\n' + CAMERA, "server: must be a table"),
    ('[[cameras]]\nid = "a"\nurl = "lavfi:x"\nfps = 3\n', "cameras[0].fps: unknown key"),
    ('[[cameras]]\nid = "Front Door"\nurl = "lavfi:x"\n', "cameras[0].id: must match [a-z0-9_-]{1,50}, got 'Front Door'"),
    ('[[cameras]]\nid = "a"\nurl = "ftp://x"\n', "cameras[0].url: scheme must be one of"),
    (CAMERA + CAMERA, "cameras[1].id: duplicate camera id 'a'"),
    ('cameras = "a"\n', "cameras: must be an array of tables ([[cameras]])"),
    ('[database]\nurl = "mysql://x"\n' + CAMERA, "database.url: must start with sqlite:/// or postgresql+psycopg://"),
    ('[server\nport = 1\n', "invalid TOML:"),
    ('[database]\nsqlite_synchronous = "off"\n' + CAMERA,
     "database.sqlite_synchronous: must be one of normal, full, got 'off'"),
    # Lists of strings are checked like every other key, element by element.
    ('[analysis]\nproviders = "gemini"\n' + CAMERA,
     "analysis.providers: must be an array of strings, got string"),
    ('[analysis]\nproviders = ["gemini", 3]\n' + CAMERA,
     "analysis.providers[1]: must be a string, got integer"),
    ('[analysis]\nproviders = ["gemini", "local"]\n' + CAMERA,
     "analysis.providers: no provider 'local' (configured: gemini)"),
    ('[analysis]\nproviders = ["gemini", "gemini"]\n' + CAMERA,
     "analysis.providers: a provider is listed twice"),
    (CAMERA + 'providers = ["x"]\n', "cameras[0].providers: no provider 'x' (configured: gemini)"),
    ('[providers.a]\nmodel = "m"\n' + CAMERA, "providers.a.kind: required (one of gemini, openai)"),
    ('[providers.a]\nkind = "claude"\n' + CAMERA,
     "providers.a.kind: must be one of gemini, openai, got 'claude'"),
    ('[providers.a]\nkind = "openai"\n' + CAMERA, "providers.a.model: required"),
    ('[providers.a]\nkind = "openai"\nmodel = "m"\nthinking = "off"\n' + CAMERA,
     "providers.a.thinking: unknown key"),
    ('[providers.a]\nkind = "openai"\nmodel = "m"\nmax_images = 0\n' + CAMERA,
     "providers.a.max_images: must be >= 1, got 0"),
    ('[providers.a]\nkind = "openai"\nmodel = "m"\nname = "b"\n' + CAMERA,
     "providers.a.name: unknown key"),
    ('[providers.A]\nkind = "openai"\nmodel = "m"\n' + CAMERA,
     "providers.A: provider names must match [a-z0-9_-]{1,50}"),
    ('providers = 3\n' + CAMERA, "providers: must be a table"),
    ('[providers]\n' + CAMERA, "providers: at least one [providers.NAME] table is needed"),
    ('[gemini]\nmodel = "x"\n[providers.a]\nkind = "openai"\nmodel = "m"\n' + CAMERA,
     "gemini: cannot be used together with [providers]"),
    ('[providers.a]\nkind = "gemini"\n[analysis]\nmedia_resolution = "low"\n' + CAMERA,
     "analysis.media_resolution: unknown key"),
    ('[gemini]\ntimeout_seconds = 5\n' + CAMERA, "gemini.timeout_seconds: must be >= 60, got 5"),
    ('[analysis]\nstatic_check_minutes = -1\n' + CAMERA,
     "analysis.static_check_minutes: must be >= 0, got -1"),
    ('[analysis]\nwindow_seconds = 5\n' + CAMERA,
     "analysis.window_seconds: must be 0 or >= 10, got 5"),
    ('[analysis]\nwindow_seconds = 601\n' + CAMERA,
     "analysis.window_seconds: must be <= 600, got 601"),
    ('[analysis]\nmax_lag_seconds = 10\n' + CAMERA,
     "analysis.max_lag_seconds: must be >= 30, got 10"),
    ('[storage]\nram_max_mb = 8\n' + CAMERA, "storage.ram_max_mb: must be >= 16, got 8"),
]


@pytest.mark.parametrize("body,message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(tmp_path, body, message):
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"vlmguard: {path}: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, ["check-config", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"vlmguard: {tmp_path / 'nope.toml'}: file not found"


@pytest.mark.e2e
def test_real_process_prints_no_traceback(tmp_path):
    path = write_config(tmp_path, '[[cameras]]\nid = "a"\n')
    proc = subprocess.run([sys.executable, "-m", "vlmguard", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"vlmguard: {path}: cameras[0].url: required\n"
    assert proc.stdout == ""


def test_check_config_masks_secrets(tmp_path):
    path = write_config(tmp_path, f"""
        [server]
        port = {free_port()}
        token = "tok-123"
        [database]
        url = "postgresql+psycopg://vlm:hunter2@db.example/vlm"
        [[cameras]]
        id = "door"
        url = "rtsp://admin:camsecret@10.0.0.5/stream?auth=xyz"
    """)
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    for secret in ("tok-123", "hunter2", "camsecret", "xyz"):
        assert secret not in result.output
    assert "rtsp://admin:***@10.0.0.5/stream?***" in result.output
    assert '"token": "***"' in result.output


def test_single_gemini_config_of_earlier_versions_runs_unchanged(tmp_path):
    """An upgraded box comes back up on its old file: [gemini] plus
    analysis.media_resolution is one provider named gemini; check-config shows the new form."""
    path = write_config(tmp_path, """
        [analysis]
        fps = 0.5
        media_resolution = "medium"
        [gemini]
        model = "gemini-3.5-flash"
        thinking = "low"
        api_key_env = "MY_KEY"
        [[cameras]]
        id = "a"
        url = "lavfi:testsrc2"
    """)
    config = load_config(path)
    assert [(p.name, p.kind, p.model) for p in config.provider_order("a")] == \
        [("gemini", "gemini", "gemini-3.5-flash")]
    provider = config.provider("gemini")
    assert (provider.media_resolution, provider.thinking, provider.api_key_env) == \
        ("medium", "low", "MY_KEY")
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    shown = __import__("json").loads(result.output)
    assert shown["analysis"]["providers"] == ["gemini"] and "gemini" not in shown
    assert "media_resolution" not in shown["analysis"]
    assert shown["providers"]["gemini"]["media_resolution"] == "medium"
    assert shown["providers"]["gemini"]["kind"] == "gemini"
    # What check-config prints, written back as TOML, is a valid config in the new form.
    again = write_config(tmp_path, f"""
        [analysis]
        providers = ["gemini"]
        [providers.gemini]
        kind = "gemini"
        model = "gemini-3.5-flash"
        media_resolution = "medium"
        [[cameras]]
        id = "a"
        url = "lavfi:testsrc2"
    """)
    assert load_config(again).provider("gemini") == replace_name(provider, api_key_env="GEMINI_API_KEY",
                                                                 thinking="off")


def replace_name(settings, **changes):
    import dataclasses
    return dataclasses.replace(settings, **changes)


def test_providers_in_order_and_per_camera(tmp_path):
    path = write_config(tmp_path, """
        [analysis]
        providers = ["cloud", "local"]
        [providers.local]
        kind = "openai"
        model = "qwen2.5vl:7b"
        base_url = "http://user:pw@127.0.0.1:11434/v1"
        images = "grid"
        [providers.cloud]
        kind = "gemini"
        [[cameras]]
        id = "a"
        url = "lavfi:testsrc2"
        [[cameras]]
        id = "private"
        url = "lavfi:testsrc2"
        providers = ["local"]
    """)
    config = load_config(path)
    assert [p.name for p in config.provider_order("a")] == ["cloud", "local"]
    assert [p.name for p in config.provider_order("private")] == ["local"]
    assert config.provider("local").images == "grid" and config.provider("local").max_images == 20
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 0 and "pw@" not in result.output
    assert '"images": "grid"' in result.output


def test_no_provider_name_outside_the_provider_package():
    """The seam: analyzer, supervisor, status, metrics and config reach providers only
    through vlmguard.vlm.registry, so no kind's name is written anywhere else."""
    from vlmguard.vlm import registry
    package = REPO / "vlmguard"
    offenders = []
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "vlm"):
            continue
        text = path.read_text().lower()
        offenders += [f"{path.relative_to(REPO)}: {kind}" for kind in registry.kinds()
                      if kind in text]
    assert offenders == []
