"""Hostile and unlucky input to config, CLI, database and supervisor: one line, never a
traceback, and the running daemon keeps running (issue 12)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmguard.cli import main
from vlmguard.config import SECTIONS, load_config
from vlmguard.errors import ConfigError

from conftest import write_config
from daemon import RunningVlmguard, free_port
from test_streamer import wait_for
from test_supervisor import alive, descendants

CAMERA = '[[cameras]]\nid = "cam1"\nurl = "lavfi:testsrc2"\n'
NUMERIC_KEYS = [(section, f.name) for section, cls in SECTIONS.items()
                for f in dataclasses.fields(cls) if f.type in ("int", "float")]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line(result, code: int, *fragments: str) -> str:
    """Exit status `code`, and stderr one line naming the problem, no traceback."""
    assert result.exit_code == code, result.output
    text = result.stderr.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in text, text
    return text


def config_with(tmp_path: Path, body: str) -> Path:
    return write_config(tmp_path, f"[storage]\ndata_dir = \"{tmp_path / 'data'}\"\n{body}\n{CAMERA}")


@pytest.mark.parametrize("section,key", NUMERIC_KEYS, ids=[f"{s}.{k}" for s, k in NUMERIC_KEYS])
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_numbers_are_refused_for_every_key(tmp_path, section, key, literal):
    table = "[storage]\n" if section == "storage" else f"[{section}]\n"
    body = f"{table}{key} = {literal}\n"
    if section != "storage":
        body = f"[storage]\ndata_dir = \"{tmp_path / 'data'}\"\n{body}"
    else:
        body += f"data_dir = \"{tmp_path / 'data'}\"\n"
    path = write_config(tmp_path, body + CAMERA)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"{section}.{key}:" in message and "\n" not in message


@pytest.mark.parametrize("value", ["1000000", "inf", "36501"])
def test_retention_beyond_what_dates_can_hold_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"storage\.retention_days: must be"):
        load_config(config_with(tmp_path, f"retention_days = {value}"))


def test_every_number_has_an_upper_bound():
    unbounded = [f"{s}.{k}" for s, k in NUMERIC_KEYS
                 if dict((f.name, f) for f in dataclasses.fields(SECTIONS[s]))[k].metadata["hi"] is None]
    assert unbounded == []


def test_the_largest_retention_still_runs_retention(tmp_path):
    from vlmguard.archiver import Archiver
    from vlmguard.store import JobStore
    config = load_config(config_with(tmp_path, "retention_days = 36500\nmax_disk_gb = 1000000"))
    with JobStore.from_config(config) as store:
        Archiver(config, store).enforce_retention()  # no date overflow


def test_toml_nested_5000_deep_is_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line(cli("check-config", "--config", str(path)), 2, "nested too deeply")


@pytest.mark.parametrize("character", ["|", "[", "]", "%", "'", "\\"])
def test_data_dir_ffmpeg_cannot_take_is_refused(tmp_path, character):
    path = write_config(tmp_path, f"[storage]\ndata_dir = \"{tmp_path}/a{character}b\"\n"
                        .replace("\\b", "\\\\b") + CAMERA)
    assert_one_line(cli("check-config", "--config", str(path)), 2, "storage.data_dir:",
                    "FFmpeg cannot write")


def test_a_relative_data_dir_under_an_unsafe_folder_is_refused(tmp_path):
    folder = tmp_path / "site|1"
    folder.mkdir()
    path = write_config(folder, CAMERA)  # data_dir "./data" lands in site|1/data
    assert_one_line(cli("check-config", "--config", str(path)), 2, "storage.data_dir:")


def test_a_data_dir_with_spaces_and_colons_records(tmp_path):
    """What the check lets through, FFmpeg really writes to."""
    from daemon import Daemon
    odd = tmp_path / "site 1: dock"
    odd.mkdir()
    daemon = Daemon(odd).start()
    try:
        daemon.wait_live()
        wait_for(lambda: list((daemon.data_dir / "archives" / "cam1").glob("*.mp4")), 40,
                 "an archive under the odd path")
    finally:
        daemon.stop()


def test_check_config_applies_the_run_time_rules(tmp_path):
    path = config_with(tmp_path, '[server]\nhost = "0.0.0.0"\n')
    assert_one_line(cli("check-config", "--config", str(path)), 2, "server.token: required")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config_with(tmp_path, f"[server]\nport = {port}\n")
        assert_one_line(cli("check-config", "--config", str(path)), 2,
                        f"cannot listen on 127.0.0.1:{port}")
        # Held by this data dir's own daemon (it holds the data-dir lock): that is fine.
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        with open(data / "vlmguard.pid", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            result = cli("check-config", "--config", str(path))
            assert result.exit_code == 0, result.output


@pytest.fixture
def made_db(tmp_path):
    """A config whose job table exists, with one job."""
    path = config_with(tmp_path, "")
    from vlmguard.store import JobStore, utcnow
    with JobStore.from_config(load_config(path)) as store:
        store.register("cam1", "/x.mp4", utcnow(), utcnow())
    return path


@pytest.mark.parametrize("command", [["job", "show"], ["retry"]])
@pytest.mark.parametrize("job_id", ["99999999999999999999", "-99999999999999999999", "0"])
def test_job_ids_out_of_range_are_one_line(made_db, command, job_id):
    assert_one_line(cli(*command, "--config", str(made_db), "--", job_id), 1, f"no job {job_id}")


@pytest.mark.parametrize("content", [b"\x00garbage" * 512, b"SQLite format 3\x00" + b"\xff" * 4000])
@pytest.mark.parametrize("command", [["jobs"], ["incidents"], ["job", "show", "1"]])
def test_garbage_database_is_one_line_exit_2(tmp_path, content, command):
    path = config_with(tmp_path, "")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vlmguard.db").write_bytes(content)
    assert_one_line(cli(*command, "--config", str(path)), 2, "cannot open database")


def test_foreign_sqlite_database_is_refused_and_left_untouched(tmp_path):
    path = config_with(tmp_path, "")
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "vlmguard.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    run = subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "not a vlmguard one" in run.stderr
    conn = sqlite3.connect(db)
    tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    conn.close()
    assert tables == ["photos"]  # nothing of ours written into it


def test_garbage_database_stops_run_with_one_line(tmp_path):
    path = config_with(tmp_path, "")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vlmguard.db").write_bytes(b"\x00garbage" * 512)
    run = subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout
    assert run.stderr.strip().startswith("vlmguard: cannot open database")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (root ignores permission bits, so chmod would prove nothing)."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    yield target
    subprocess.run(["umount", "-l", str(target)])


def test_read_only_data_dir_is_one_line_exit_2(tmp_path, read_only_dir):
    path = write_config(tmp_path, f"[storage]\ndata_dir = \"{read_only_dir}\"\n{CAMERA}")
    run = subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"vlmguard: cannot use data directory {read_only_dir}: "
                                  "Read-only file system")
    status = cli("status", "--config", str(path))
    assert "Traceback" not in status.output and status.exit_code == 1


@pytest.fixture
def running(tmp_path):
    started = []

    def start(**kwargs) -> RunningVlmguard:
        daemon = RunningVlmguard(tmp_path, "http://127.0.0.1:9", **kwargs).start()
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.kill()


def test_sighup_to_a_port_someone_holds_keeps_the_running_config(running):
    daemon = running(workers=0)
    daemon.wait_live()
    streamer = wait_for(lambda: daemon.child_pid("streamer"), 20, "the streamer")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace(f"port = {daemon.port}", f"port = {port}", 1))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "reload refused, keeping the running config"
                             for e in daemon.log_events()), 20, "the reload refused")
        refused = [e for e in daemon.log_events() if e["event"].startswith("reload refused")][0]
        assert f"cannot listen on 127.0.0.1:{port}" in refused["error"]
        time.sleep(3)
        assert daemon.proc.poll() is None and daemon.child_pid("streamer") == streamer
        daemon.wait_live()  # still serving on the old port
    assert daemon.stop() == 0


def test_children_die_with_the_supervisor_even_when_a_sibling_is_stopped(running):
    daemon = running(workers=1)
    daemon.wait_live()
    family = descendants(daemon.proc.pid)
    streamer = wait_for(lambda: daemon.child_pid("streamer"), 20, "the streamer")
    assert len(family) >= 4  # archiver, streamer, analyzer, FFmpeg
    os.kill(streamer, signal.SIGSTOP)
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not any(alive(p) for p in family), 20, "every descendant to exit")
    # The stopped streamer was continued and stopped in order: FFmpeg's open archive was
    # closed and handed over, not left in partial/.
    assert not list((daemon.data_dir / "partial" / "cam1").glob("*.ts"))


def test_analysis_lowers_its_io_priority_on_this_architecture():
    code = ("import os, subprocess; from vlmguard.analyzer import lower_priority; lower_priority();"
            "print(subprocess.run(['ionice', '-p', str(os.getpid())], capture_output=True,"
            " text=True).stdout.strip(), os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["best-effort:", "prio", "7", "10"], out.stdout + out.stderr


# -- a corpus of our own: whatever a config holds, loading it ends in a Config or one line --

TOML_VALUES = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(allow_nan=True),
    st.booleans(), st.text(max_size=40),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
)


def toml_literal(value) -> str:
    import json
    import math
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (int, list)):
        return json.dumps(value)
    return json.dumps(value)  # a TOML basic string is a JSON string


ALL_KEYS = [(section, f.name) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)] + [("cameras", "id"), ("cameras", "url"),
                                                 ("cameras", "transcode"), ("cameras", "x")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(ALL_KEYS), value=TOML_VALUES)
def test_any_value_for_any_key_loads_or_is_one_line(tmp_path, key, value):
    section, name = key
    camera = {"id": '"cam1"', "url": '"lavfi:testsrc2"'}
    if section == "cameras":
        camera[name] = toml_literal(value)
        body = "[[cameras]]\n" + "".join(f"{k} = {v}\n" for k, v in camera.items())
    else:
        body = f"[{section}]\n{name} = {toml_literal(value)}\n{CAMERA}"
    path = tmp_path / "fuzz.toml"
    path.write_text(body)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
