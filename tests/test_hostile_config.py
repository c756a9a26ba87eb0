"""Hostile and unlucky input to the config, the CLI, the database and the supervisor
(issue 12): every case is one line and a clear exit status, never a traceback, never a
leaked secret, never a daemon left running without its supervisor."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmguard.archiver import Archiver
from vlmguard.cli import main
from vlmguard.config import SECTIONS, CameraConfig, StorageConfig, load_config, masked
from vlmguard.ffmpeg import camera_command, ffmpeg_binary
from vlmguard.store.bundle import Store

from helpers import free_port, wait_for, write_config
from helpers.config_fuzz import ANY_VALUE, NUMERIC, assert_loads_or_one_line, toml_literal
from helpers.processes import alive, descendants

CAMERA = '[[cameras]]\nid = "a"\nurl = "lavfi:testsrc2"\n'
FLOATS = [(section, f) for section, f in NUMERIC if f.type == "float"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmguard: "), result.stderr
    return lines[0]


def vlmguard_process(*args, prefix=(), timeout=60):
    return subprocess.run([*prefix, sys.executable, "-m", "vlmguard", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


# -- item 4: non-finite numbers ----------------------------------------------------------

@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize("section,spec", FLOATS, ids=[f"{s}.{f.name}" for s, f in FLOATS])
def test_non_finite_number_is_refused_naming_the_key(tmp_path, section, spec, literal):
    path = write_config(tmp_path, f"[{section}]\n{spec.name} = {literal}\n" + CAMERA)
    line = one_line_error(cli("check-config", "--config", path))
    assert line.startswith(f"vlmguard: {path}: {section}.{spec.name}: must be a finite number")


# -- item 5: every range has a maximum the code copes with ------------------------------

def test_every_numeric_key_declares_both_bounds():
    for section, spec in NUMERIC:
        assert spec.metadata["lo"] is not None and spec.metadata["hi"] is not None, \
            f"{section}.{spec.name} needs lo= and hi="


@pytest.mark.parametrize("value", ["1000000", "1e308"])
def test_huge_retention_is_refused(tmp_path, value):
    path = write_config(tmp_path, f"[storage]\nretention_days = {value}\n" + CAMERA)
    line = one_line_error(cli("check-config", "--config", path))
    assert line == f"vlmguard: {path}: storage.retention_days: must be <= 36500, got {tomllib.loads('x = ' + value)['x']}"


@pytest.mark.parametrize("bound", ["lo", "hi"])
def test_code_copes_with_every_key_at_its_bound(tmp_path, bound):
    """Each key at its limit: the archiver's retention dates and disk budgets, the job
    table's leases and backoffs all still compute."""
    lines = {}
    for section, spec in NUMERIC:
        if (section, spec.name) == ("analysis", "workers"):
            value = 2  # 64 analyzers are a memory question, not a range one
        else:
            value = spec.metadata[bound]
        lines.setdefault(section, []).append(f"{spec.name} = {value}")
    body = "".join(f"[{s}]\n" + "\n".join(rows) + "\n" for s, rows in lines.items())
    body = body.replace("[storage]\n", f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    config = load_config(write_config(tmp_path, body + CAMERA))
    with Store.from_config(config) as store:
        archiver = Archiver(config, store.queue, store.recordings)
        archive = config.data_dir / "archives" / "a" / "20261126T080000Z.mp4"
        archive.write_bytes(b"x")
        archiver.enforce_retention()
        start = datetime(2026, 11, 26, 8, tzinfo=timezone.utc)
        store.queue.register("a", archive, start, start)
        job = store.queue.claim("w")
        store.queue.heartbeat(job)
        store.queue.fail(job, "boom")
        assert store.queue.seconds_until_due() is not None
        store.queue.retry(job.id)


# -- item 9: out-of-range ids, deep TOML, unusable databases -------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def filled(request, config_file):
    if request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        config_file.write_text(config_file.read_text() + f'\n[database]\nurl = "{pg_url}"\n')
    with Store.from_config(load_config(config_file)) as store:
        start = datetime(2026, 11, 26, 8, tzinfo=timezone.utc)
        store.queue.register("cam1", "/a/0.mp4", start, start)
    return config_file


@pytest.mark.parametrize("job_id", ["99999999999999999999", "9223372036854775808",
                                    "2147483648", "0", "-99999999999999999999"])
@pytest.mark.parametrize("command", [("job", "show"), ("retry",)])
def test_out_of_range_job_id_is_no_job(filled, command, job_id):
    result = cli(*command, "--config", filled, "--", job_id)
    assert one_line_error(result, 1) == f"vlmguard: no job {int(job_id)}"


@pytest.mark.e2e
@pytest.mark.parametrize("body", [
    "a = " + "[" * 5000 + "]" * 5000,
    "a = " + "{b = " * 5000 + "1" + "}" * 5000,
    "[" + ".".join(["a"] * 5000) + "]\n",
], ids=["arrays", "inline-tables", "dotted-table"])
def test_deeply_nested_toml_is_one_line_naming_the_file(tmp_path, body):
    path = write_config(tmp_path, body)
    proc = vlmguard_process("check-config", "--config", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"vlmguard: {path}: ") and proc.stderr.count("\n") == 1


def garbage_database(config_file: Path) -> None:
    (config_file.parent / "data").mkdir(exist_ok=True)
    (config_file.parent / "data" / "vlmguard.db").write_bytes(os.urandom(8192))


def foreign_database(config_file: Path) -> None:
    (config_file.parent / "data").mkdir(exist_ok=True)
    conn = sqlite3.connect(config_file.parent / "data" / "vlmguard.db")
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize("damage,message", [(garbage_database, "file is not a database"),
                                            (foreign_database, "is not a vlmguard database")])
def test_unusable_database_is_one_line_exit_2(config_file, damage, message):
    damage(config_file)
    before = (config_file.parent / "data" / "vlmguard.db").read_bytes()
    for command in (["status"], ["jobs"], ["incidents"], ["job", "show", "1"], ["retry", "1"]):
        assert message in one_line_error(cli(*command, "--config", config_file))
    proc = vlmguard_process("run", "--config", config_file)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    # Nothing was added to someone else's file.
    assert (config_file.parent / "data" / "vlmguard.db").read_bytes() == before


@pytest.fixture
def shared_tmp():
    """A folder another user can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="vlmguard-ro-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path)


@pytest.mark.e2e
def test_read_only_data_dir_is_one_line_exit_2(shared_tmp):
    data = shared_tmp / "data"
    path = write_config(shared_tmp, f'[storage]\ndata_dir = "{data}"\n' + CAMERA)
    Store.from_config(load_config(path)).close()
    for entry in (data, *data.iterdir()):
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    data.chmod(0o555)
    # root writes anywhere: run as nobody, for whom the folder is read-only.
    prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") if os.geteuid() == 0 else ()
    run = vlmguard_process("run", "--config", path, prefix=prefix)
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"vlmguard: cannot use data directory {data}: Permission denied\n"
    jobs = vlmguard_process("jobs", "--config", path, prefix=prefix)
    assert jobs.returncode == 2 and jobs.stderr.count("\n") == 1 and "readonly" in jobs.stderr


@pytest.mark.parametrize("body,message", [
    ('[gemini]\napi_key_env = "KEY\\u0000X"\n' + CAMERA, "gemini.api_key_env: must not contain a NUL"),
    ('[[cameras]]\nid = "a"\nurl = "rtsp://h/s\\u0000"\n', "cameras[0].url: must not contain a NUL"),
    ('[[cameras]]\nid = "a"\nurl = "rtsp://h/s\\nforged log line"\n',
     "cameras[0].url: must not contain control characters"),
])
def test_control_characters_in_strings_are_refused(tmp_path, body, message):
    path = write_config(tmp_path, body)
    assert one_line_error(cli("check-config", "--config", path)).startswith(
        f"vlmguard: {path}: {message}")


# -- item 10: paths FFmpeg cannot take ---------------------------------------------------

@pytest.mark.parametrize("char", list("|[]\\':%") + ["\n", "\t"])
def test_data_dir_ffmpeg_cannot_take_is_refused(tmp_path, char):
    path = write_config(tmp_path, f"[storage]\ndata_dir = {json.dumps(f'/srv/cams{char}x')}\n" + CAMERA)
    line = one_line_error(cli("check-config", "--config", path))
    assert line.startswith(f"vlmguard: {path}: storage.data_dir: ")
    assert repr(char) in line


def test_relative_data_dir_under_a_hostile_folder_is_refused(tmp_path):
    folder = tmp_path / "a|b"
    folder.mkdir()
    path = write_config(folder, CAMERA)
    assert "storage.data_dir:" in one_line_error(cli("check-config", "--config", path))


def recording(live: Path, partial: Path) -> bool:
    playlist = live / "index.m3u8"
    return (playlist.exists() and "#EXTINF" in playlist.read_text()
            and any(p.stat().st_size > 0 for p in partial.glob("*.ts")))


def run_camera_ffmpeg(data_dir: Path, seconds: float) -> tuple[Path, Path]:
    """One camera's real FFmpeg command until it records there, or for `seconds`."""
    live, partial = data_dir / "live" / "a", data_dir / "partial" / "a"
    for folder in (live, partial):
        folder.mkdir(parents=True)
    camera = CameraConfig(id="a", url="lavfi:testsrc2=size=160x120:rate=10")
    command = camera_command(ffmpeg_binary(), camera, StorageConfig(segment_seconds=1), live,
                             partial, partial / "run-1.csv", True, 0)
    # Run from the folder's parent: a split output spec lands relative to the cwd.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=data_dir.parent)
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline and not recording(live, partial):
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    return live, partial


@pytest.mark.e2e
def test_odd_but_accepted_data_dir_records_with_real_ffmpeg(tmp_path):
    data_dir = tmp_path / 'cams dir=é,;#&($"!~'
    path = write_config(tmp_path, f"[storage]\ndata_dir = {json.dumps(str(data_dir))}\n" + CAMERA)
    assert load_config(path).data_dir == data_dir
    assert recording(*run_camera_ffmpeg(data_dir, 60))


@pytest.mark.e2e
@pytest.mark.parametrize("char", ["|", ":"])
def test_refused_characters_really_break_ffmpeg(tmp_path, char):
    """Why they are refused: the same command under such a folder records nothing there."""
    live, partial = run_camera_ffmpeg(tmp_path / f"cams{char}x", 4)
    assert not (live / "index.m3u8").exists()
    assert not list(partial.glob("*.ts"))


# -- item 14: check-config applies the run-time rules --------------------------------------

def test_check_config_refuses_open_host_without_token(tmp_path):
    path = write_config(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n' + CAMERA)
    line = one_line_error(cli("check-config", "--config", path))
    assert line == (f"vlmguard: {path}: server.token: required when server.host (0.0.0.0) "
                    "is not a loopback address")


def test_check_config_refuses_a_port_someone_else_holds(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        path = write_config(tmp_path, f"[server]\nport = {port}\n" + CAMERA)
        line = one_line_error(cli("check-config", "--config", path))
    assert line == f"vlmguard: {path}: server.port: 127.0.0.1:{port} is already in use"
    assert cli("check-config", "--config", path).exit_code == 0  # free again


# -- secrets --------------------------------------------------------------------------------

def test_check_config_masks_every_secret(tmp_path):
    path = write_config(tmp_path, f"""
        [server]
        port = {free_port()}
        token = "Zq-token"
        [database]
        url = "postgresql+psycopg://vlm:Zq-dbpass@db.example/vlm?sslpassword=Zq-dbquery"
        [gemini]
        base_url = "https://gemuser:Zq-gempass@proxy.example/v1?key=Zq-gemkey"
        [[cameras]]
        id = "a"
        url = "rtsp://admin:Zq-campass@10.0.0.5/s?authtoken=Zq-camquery"
        [[cameras]]
        id = "b"
        url = "rtsp://Zq-bareuser@10.0.0.6/s"
        [[cameras]]
        id = "c"
        url = "rtsp://u:Zq-broken@[::1/s"
    """)
    result = cli("check-config", "--config", path)
    assert result.exit_code == 0, result.output
    assert "Zq" not in result.output
    assert "rtsp://admin:***@10.0.0.5/s?***" in result.output
    assert "rtsp://***@10.0.0.6/s" in result.output


SECRET = st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:%",
                 min_size=1, max_size=30).map(lambda s: "Zq" + s)


@settings(database=None, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(alphabet=string.ascii_lowercase, max_size=8), password=SECRET, query=SECRET,
       token=SECRET)
def test_fuzz_secrets_never_reach_check_config_output(tmp_path, user, password, query, token):
    body = (f'[server]\ntoken = {json.dumps(token)}\n[[cameras]]\nid = "a"\n'
            f'url = {json.dumps(f"rtsp://{user}:{password}@cam.example/s?t={query}")}\n')
    config = load_config(write_config(tmp_path, body))
    assert "Zq" not in json.dumps(masked(config))


# -- the corpus: fuzzed values for every key, odd files ----------------------------------------

def typed_value(spec) -> st.SearchStrategy:
    meta = spec.metadata
    if spec.type == "int":
        return st.integers(min_value=int(meta["lo"]) - 5, max_value=int(meta["hi"]) + 5)
    if spec.type == "float":
        return st.floats(min_value=meta["lo"] - 1, max_value=meta["hi"] * 2) | st.floats()
    if meta["choices"]:
        return st.sampled_from(meta["choices"]) | st.text(max_size=10)
    return st.text(max_size=60)


FIELDS = [(section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


@st.composite
def documents(draw):
    """A few keys of any sections, each with a value of its own type or of any other."""
    chosen = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=5,
                           unique_by=lambda sf: (sf[0], sf[1].name)))
    return {(section, spec.name): draw(typed_value(spec) | ANY_VALUE) for section, spec in chosen}


@settings(database=None, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data_dir=st.text(max_size=40))
def test_fuzz_data_dir(tmp_path, data_dir):
    body = f"[storage]\ndata_dir = {toml_literal(data_dir)}\n" + CAMERA
    assert_loads_or_one_line(write_config(tmp_path, body))


@settings(database=None, max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents(), with_camera=st.booleans())
def test_fuzz_every_key_loads_or_is_one_config_error(tmp_path, document, with_camera):
    tables: dict[str, list[str]] = {}
    for (section, key), value in document.items():
        tables.setdefault(section, []).append(f"{key} = {toml_literal(value)}")
    body = "".join(f"[{s}]\n" + "\n".join(rows) + "\n" for s, rows in tables.items())
    assert_loads_or_one_line(write_config(tmp_path, body + (CAMERA if with_camera else "")))


CAMERA_TABLES = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=12) | ANY_VALUE, "url": st.text(max_size=40) | ANY_VALUE,
    "prompt": st.text(max_size=20) | ANY_VALUE,
    "transcode": st.sampled_from(["auto", "always", "never"]) | ANY_VALUE,
    "extra": ANY_VALUE})


@settings(database=None, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cameras=st.lists(CAMERA_TABLES, max_size=3), raw=st.binary(max_size=30))
def test_fuzz_cameras_and_raw_bytes(tmp_path, cameras, raw):
    body = "".join("[[cameras]]\n" + "".join(f"{json.dumps(k)} = {toml_literal(v)}\n"
                                             for k, v in table.items()) for table in cameras)
    assert_loads_or_one_line(write_config(tmp_path, body))
    path = tmp_path / "raw.toml"
    path.write_bytes(raw)
    assert_loads_or_one_line(path)


@pytest.mark.parametrize("name", ["with space.toml", "ünï.toml", "a|b[c].toml", "line\nbreak.toml",
                                  "-dash.toml", "'quote\".toml"])
def test_odd_config_file_names(tmp_path, name):
    path = tmp_path / name
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[server]\nport = {free_port()}\n'
                    + CAMERA)
    result = cli("check-config", "--config", path)
    assert result.exit_code == 0, result.output


@pytest.mark.e2e
@pytest.mark.parametrize("setup,message", [
    (lambda p: p.mkdir(), "cannot read"),
    (lambda p: p.write_bytes(b"\xff\xfe[server]\n"), "cannot read"),
    (lambda p: p.write_text("x = 1\n"), "x: unknown key"),
    (lambda p: p.symlink_to(p.parent / "nowhere"), "file not found"),
], ids=["directory", "not-utf8", "stray-key", "dangling-symlink"])
def test_unreadable_config_files_are_one_line(tmp_path, setup, message):
    path = tmp_path / "config.toml"
    setup(path)
    proc = vlmguard_process("check-config", "--config", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


# -- item 15: the analysis processes' I/O priority really drops ------------------------------

@pytest.mark.e2e
def test_lower_priority_sets_best_effort_7():
    script = ("import os, subprocess; from vlmguard.analyzer import lower_priority; "
              "lower_priority(); print(subprocess.run(['ionice', '-p', str(os.getpid())], "
              "capture_output=True, text=True).stdout.strip())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "best-effort: prio 7", proc.stdout + proc.stderr


# -- items 11, 12, 14: the running daemon ----------------------------------------------------

@pytest.mark.e2e
def test_children_die_with_the_supervisor_even_when_a_sibling_is_stopped(vlmguard):
    daemon = vlmguard(workers=1)
    daemon.wait_live()
    streamer = wait_for(lambda: daemon.child_pid("streamer"), 20, "the streamer")
    wait_for(lambda: daemon.child_pid("analyzer-0"), 20, "the analyzer")
    family = descendants(daemon.proc.pid)
    assert len(family) >= 4  # archiver, streamer, its FFmpeg, an analyzer
    os.kill(streamer, signal.SIGSTOP)
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not any(alive(p) for p in family), 40, "every descendant to exit")
    # Each child, the stopped one included, ran its orderly stop.
    events = [e["event"] for e in daemon.log_events()]
    for stopped in ("archiver stopped", "streamer stopped", "analyzer stopped"):
        assert stopped in events


@pytest.mark.e2e
def test_reload_that_cannot_start_keeps_the_running_config(vlmguard):
    daemon = vlmguard(workers=0)
    daemon.wait_live()
    # check-config on the running daemon's own config: the port is its own.
    assert cli("check-config", "--config", daemon.config_path).exit_code == 0
    streamer = daemon.child_pid("streamer")
    text = daemon.config_path.read_text()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        daemon.config_path.write_text(text.replace(f"port = {daemon.port}", f"port = {taken}"))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: [e for e in daemon.log_events()
                                    if e["event"].startswith("reload refused")], 20, "the refusal")
    assert f"127.0.0.1:{taken} is already in use" in refused[0]["error"]
    time.sleep(1)
    assert daemon.child_pid("streamer") == streamer and alive(streamer)
    daemon.wait_live()
    assert daemon.stop() == 0


# -- the read commands under odd arguments ----------------------------------------------------

@pytest.fixture
def sqlite_filled(config_file):
    with Store.from_config(load_config(config_file)) as store:
        start = datetime(2026, 11, 26, 8, tzinfo=timezone.utc)
        store.queue.register("cam1", "/a/0.mp4", start, start)
    return config_file


@settings(database=None, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(camera=st.text(max_size=60), job_id=st.integers(min_value=-2**80, max_value=2**80))
def test_fuzz_read_commands_never_trace(sqlite_filled, camera, job_id):
    config = ["--config", sqlite_filled]
    for args in (["jobs", *config, "--camera", camera], ["incidents", *config, "--camera", camera],
                 ["job", "show", *config, "--", str(job_id)], ["retry", *config, "--", str(job_id)]):
        result = cli(*args)
        assert result.exit_code in (0, 1), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args
        assert "Traceback" not in result.output
