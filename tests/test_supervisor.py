"""`vlmguard run`: the whole daemon as systemd runs it, children killed and stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vlmguard.health import run_dir
from vlmguard.livestate import daemon_pid
from vlmguard.store.bundle import Store

from helpers import wait_for
from helpers.db import db_rows, status_counts
from helpers.media import decoded_frames
from helpers.processes import alive, descendants

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

REPO = Path(__file__).resolve().parent.parent


def all_completed(daemon, job_ids) -> bool:
    marks = ",".join(str(i) for i in job_ids)
    return db_rows(daemon, f"SELECT count(*) FROM analysis_jobs WHERE id IN ({marks}) "
                           "AND status = 'completed'")[0][0] == len(job_ids)


def job_ids(daemon) -> list[int]:
    return [i for (i,) in db_rows(daemon, "SELECT id FROM analysis_jobs")]


def analyzer_state(daemon, name: str) -> str:
    import json
    try:
        return json.loads((run_dir(daemon.data_dir) / f"{name}.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return ""


def test_run_streams_archives_and_analyses(vlmguard):
    daemon = vlmguard()
    daemon.wait_live()
    for name in ("archiver", "streamer", "analyzer-0", "analyzer-1"):  # as top and pgrep show them
        pid = wait_for(lambda name=name: daemon.child_pid(name), 20, name)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == name
    assert decoded_frames(daemon.url(), seconds=5) >= 100
    wait_for(lambda: status_counts(daemon).get("completed", 0) >= 2, 60, "two completed jobs")
    incidents = db_rows(daemon, "SELECT count(*) FROM incidents")[0][0]
    assert incidents >= 2
    assert daemon.stop() == 0
    events = [e["event"] for e in daemon.log_events()]
    assert events.index("vlmguard running") < events.index("stopping") < events.index("vlmguard stopped")


VICTIMS = ("streamer", "archiver", "analyzer-0", "analyzer-1")


def test_each_sigkilled_child_is_restarted_and_no_job_is_lost(vlmguard, gemini):
    """One daemon, each kind of child SIGKILLed in turn (the analyzers mid-job): each is
    restarted alone and recording goes on; then no job is lost or doubled."""
    daemon = vlmguard()
    daemon.wait_live()
    archives = daemon.data_dir / "archives" / "cam1"
    for victim in VICTIMS:
        # An answer takes longer than an archive (10 s), so both analyzers end up mid-job.
        gemini.generate_delay = 12
        old = wait_for(lambda: daemon.child_pid(victim), 30, f"{victim}'s pid")
        if victim.startswith("analyzer"):
            wait_for(lambda: analyzer_state(daemon, victim).startswith("job"), 60, f"{victim} busy")
        os.kill(old, signal.SIGKILL)
        gemini.generate_delay = 0
        new = wait_for(lambda: (pid := daemon.child_pid(victim)) and pid != old and pid, 40,
                       f"{victim} restarted")
        assert alive(new)
        daemon.wait_live()
        archives_before = len(list(archives.glob("*.ts")))
        wait_for(lambda: len(list(archives.glob("*.ts"))) >= archives_before + 1, 40,
                 f"another archive after {victim}'s restart")
    assert daemon.stop() == 0
    exits = [(e["child"], e["signal"]) for e in daemon.log_events() if e["event"] == "child exited"]
    assert exits == [(victim, "SIGKILL") for victim in VICTIMS]
    # Every archive on disk has exactly one job; no job holds a second set of incidents.
    files = sorted(p.name for p in archives.glob("*.ts"))
    jobs = sorted(Path(p).name for (p,) in db_rows(daemon, "SELECT video_path FROM analysis_jobs"))
    assert files == jobs
    doubled = db_rows(daemon, "SELECT j.id FROM analysis_jobs j JOIN incidents i ON i.job_id = j.id "
                              "GROUP BY j.id HAVING count(i.id) != max(j.incident_count)")
    assert doubled == []
    # After one more run with a healthy API, every one of those jobs ends completed.
    before = job_ids(daemon)
    daemon.start()
    wait_for(lambda: all_completed(daemon, before), 90, "every job completed")
    assert daemon.stop() == 0


def test_sigkilled_parent_leaves_no_child_or_ffmpeg(vlmguard):
    daemon = vlmguard()
    daemon.wait_live()
    family = descendants(daemon.proc.pid)
    ffmpegs = [p for p in family if "ffmpeg" in Path(f"/proc/{p}/cmdline").read_text()]
    assert ffmpegs and len(family) >= 5  # 4 children and FFmpeg
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not any(alive(p) for p in family), 15, "every descendant to exit")


def test_the_lock_ends_with_the_supervisor_not_its_children(vlmguard):
    """Children are forked from the supervisor; they must not keep its data-dir lock."""
    daemon = vlmguard(workers=1)
    daemon.wait_live()
    children = [daemon.child_pid(name) for name in ("archiver", "streamer", "analyzer-0")]
    for pid in children:
        os.kill(pid, signal.SIGSTOP)  # so they cannot exit before the check
    try:
        daemon.proc.kill()
        daemon.proc.wait()
        assert all(alive(pid) for pid in children)
        assert daemon_pid(daemon.data_dir) is None
    finally:
        for pid in children:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "the children to exit")


def test_sigterm_during_analysis_hands_the_job_back(vlmguard, gemini):
    gemini.generate_delay = 60  # the analysis is still waiting for Gemini when the stop comes
    daemon = vlmguard(workers=1)
    daemon.wait_live()
    wait_for(lambda: gemini.generate_started.is_set(), 40, "a request in progress")
    started = time.time()
    assert daemon.stop() == 0
    assert time.time() - started < 45
    counts = status_counts(daemon)
    assert counts.get("processing", 0) == 0 and counts.get("failed", 0) == 0
    assert db_rows(daemon, "SELECT max(retry_count) FROM analysis_jobs")[0][0] == 0
    # The archive open at the stop was closed, filed and registered.
    files = sorted(p.name for p in (daemon.data_dir / "archives" / "cam1").glob("*.ts"))
    jobs = sorted(Path(p).name for (p,) in db_rows(daemon, "SELECT video_path FROM analysis_jobs"))
    assert files == jobs and len(files) >= 1
    assert not list((daemon.data_dir / "partial" / "cam1").glob("*.ts"))
    assert not list((daemon.data_dir / "closed" / "cam1").glob("*.ts"))
    gemini.generate_delay = 0
    before = job_ids(daemon)
    daemon.start()
    wait_for(lambda: all_completed(daemon, before), 60, "the job completed")
    assert daemon.stop() == 0


def test_sd_notify_ready_watchdog_stopping(vlmguard, tmp_path):
    import threading
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.5)
    messages, done = [], threading.Event()

    def receive():  # as systemd does, read as they come
        while not done.is_set():
            try:
                messages.append(listener.recv(4096).decode())
            except socket.timeout:
                continue
    reader = threading.Thread(target=receive)
    reader.start()
    daemon = vlmguard(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    daemon.wait_live()
    # Only the supervisor may reach systemd: what its children run never sees the socket.
    ffmpeg = next(p for p in descendants(daemon.proc.pid)
                  if "ffmpeg" in Path(f"/proc/{p}/cmdline").read_text())
    assert b"NOTIFY_SOCKET" not in Path(f"/proc/{ffmpeg}/environ").read_bytes()
    wait_for(lambda: messages.count("WATCHDOG=1") >= 4, 20, "four watchdog pings")
    assert daemon.stop() == 0
    wait_for(lambda: "STOPPING=1" in messages, 5, "STOPPING")
    done.set()
    reader.join()
    listener.close()
    kinds = [m.split("=")[0] for m in messages if not m.startswith("STATUS=")]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING", messages
    assert kinds.count("WATCHDOG") >= 4 and set(kinds[1:-1]) == {"WATCHDOG"}
    status = [m for m in messages if m.startswith("STATUS=")]
    assert status and re.fullmatch(r"STATUS=cameras live \d/1, jobs pending \d+, analyzers busy \d/2",
                                   status[-1]), status


def test_only_the_streamers_crash_loop_ends_the_daemon(vlmguard):
    """Other roles back off alone (tests/test_outages.py); without the streamer there is
    no video, so its crash loop is the one that stops vlmguard for systemd to restart."""
    daemon = vlmguard(workers=0, daemon="max_restarts = 2")
    daemon.wait_live()
    # Someone else takes the port: the streamer now dies at once on every start.
    os.kill(wait_for(lambda: daemon.child_pid("streamer"), 20, "the streamer"), signal.SIGKILL)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wait_for(lambda: squat(squatter, daemon.port), 10, "the port")
    try:
        assert daemon.proc.wait(90) == 1
    finally:
        squatter.close()
    loop = [e for e in daemon.log_events() if e["event"].startswith("crash loop")]
    assert loop and loop[0]["child"] == "streamer" and loop[0]["level"] == "error"
    assert "stopping vlmguard" in loop[0]["event"]


def squat(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return True
    except OSError:
        return False


def test_hung_child_is_killed_and_restarted(vlmguard):
    daemon = vlmguard(daemon="hang_seconds = 5")
    daemon.wait_live()
    old = daemon.child_pid("streamer")
    os.kill(old, signal.SIGSTOP)
    wait_for(lambda: (pid := daemon.child_pid("streamer")) and pid != old, 40, "a new streamer")
    daemon.wait_live()
    hung = [e for e in daemon.log_events() if e["event"] == "child hung: no heartbeat, killing it"]
    assert hung
    assert hung[0]["stack_logged"] is False  # a stopped child runs no code: no stack
    assert daemon.stop() == 0


def test_second_instance_is_refused(vlmguard):
    daemon = vlmguard()
    daemon.wait_live()
    proc = subprocess.run([*daemon.proc.args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"vlmguard: another vlmguard (pid {daemon.proc.pid}) is "
                                   f"already running on {daemon.data_dir}")
    assert daemon.stop() == 0


def test_sighup_reloads_cameras_and_keeps_running_on_a_bad_config(vlmguard):
    daemon = vlmguard()
    daemon.wait_live()
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text + '\n[[cameras]]\nid = "cam2"\nurl = "lavfi:testsrc=size=320x240:rate=25"\n')
    with Store(f"sqlite:///{daemon.data_dir / 'vlmguard.db'}") as store:
        store.pauses.pause("gemini", "bad_key", "bad API key", probe_in=600)  # the key was fixed since
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_live("cam2", timeout=60)
        wait_for(lambda: not store.pauses.provider_state("gemini").paused, 30, "the probe at SIGHUP")
    daemon.config_path.write_text(text + "\n[server]\nbogus = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e["event"].startswith("reload refused") for e in daemon.log_events()),
             20, "the refusal")
    daemon.wait_live("cam2")
    assert daemon.stop() == 0


def test_systemd_unit_is_hardened_and_valid(tmp_path):
    unit = REPO / "systemd" / "vlmguard.service"
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for vlmguard.service: ([\d.]+)",
                               proc.stdout).group(1))
    assert exposure <= 2.0, proc.stdout
    # verify checks ExecStart's binary exists: point it at this checkout's vlmguard.
    installed = tmp_path / "vlmguard.service"
    installed.write_text(unit.read_text().replace("/opt/vlmguard/.venv/bin/vlmguard",
                                                  str(REPO / ".venv" / "bin" / "vlmguard")))
    proc = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_role_table_orders_start_and_stop_and_adds_the_notifier_when_alerting(tmp_path):
    from helpers import write_config
    from vlmguard import notifier
    from vlmguard.config import load_config
    from vlmguard.supervisor import ROLES, plan_children

    camera = '[[cameras]]\nid = "a"\nurl = "lavfi:testsrc2"\n'
    plain = load_config(write_config(tmp_path, "[analysis]\nworkers = 2\n" + camera))
    assert [c.name for c in plan_children(plain)] == ["archiver", "streamer", "analyzer-0",
                                                      "analyzer-1"]
    alerting = load_config(write_config(tmp_path, '[mqtt]\nhost = "127.0.0.1"\n' + camera))
    children = plan_children(alerting)
    assert [c.name for c in children] == ["archiver", "streamer", "notifier", "analyzer-0",
                                          "analyzer-1"]
    assert children[2].role.entry is notifier.main
    assert children[2].hang_seconds == alerting.daemon.hang_seconds
    # Analyzers first (they make incidents), the notifier next (it sends them).
    assert [r.name for r in sorted(ROLES, key=lambda r: r.stop_order)] == [
        "analyzer", "notifier", "streamer", "archiver"]
