"""Three boxes on one PostgreSQL, each a `vlmguard run` in its own mount and UTS namespaces
(its own host name, /dev/shm and data directory: no box can read another's footage), all
on this machine's network so they reach 127.0.0.1's PostgreSQL.

Two recording boxes (one red camera each, no analyzer) and one analysis-only box (no
camera, two analyzers, the project's Gemini-protocol server as its model): every window
ends completed by the analysis-only box; each incident's alert arrives from the box that
recorded it with a snapshot on that box's server; box A's API lists box B's incident with
a clip that plays from box B; box B stopped for a minute leaves its windows waiting (none
fails) and they complete when it returns. Needs root (unshare).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlmguard.store.bundle import Store

from alert_receiver import Receiver
from helpers import free_port

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="needs root and unshare for the boxes' namespaces")]

RED = "lavfi:color=c=red:size=320x240:rate=10"
REPO = Path(__file__).resolve().parent.parent


class Box:
    """One `vlmguard run` in fresh mount and UTS namespaces: a tmpfs over /dev/shm (emptied
    by a stop, as a reboot does) and the box's own folder over the data directory (the same
    path on every box, each box its own files)."""

    def __init__(self, base: Path, name: str, data_dir: Path, *, pg_url: str, gemini_url: str,
                 hook: str, camera: str | None, workers: int):
        self.name = name
        self.port = free_port()
        self.folder = base / name
        self.folder.mkdir(exist_ok=True)
        self.data_dir = data_dir
        self.log_path = self.folder / "vlmguard.log"
        cameras = f'[[cameras]]\nid = "{camera}"\nurl = "{RED}"\n' if camera else ""
        self.config_path = self.folder / "config.toml"
        self.config_path.write_text(f"""
[server]
port = {self.port}
[storage]
data_dir = "{data_dir}"
segment_seconds = 1
archive_seconds = 20
[database]
url = "{pg_url}"
[analysis]
workers = {workers}
window_seconds = 10
lease_seconds = 10
retry_backoff_seconds = 0.5
poll_seconds = 0.5
static_check_minutes = 0
[gemini]
base_url = "{gemini_url}"
timeout_seconds = 60
[daemon]
node = "{name}"
stop_timeout_seconds = 15
[[alerts.rules]]
name = "all"
min_severity = "low"
cooldown_seconds = 0
webhooks = ["{hook}"]
{cameras}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Box":
        own = self.folder / "data"  # outlives a stop, as a box's disk does
        own.mkdir(exist_ok=True)
        inner = (f"mount -t tmpfs tmpfs /dev/shm && mount --bind {own} {self.data_dir} && "
                 f"hostname {self.name} && exec {sys.executable} -m vlmguard run "
                 f"--config {self.config_path}")
        self.log = open(self.log_path, "a")
        env = {**os.environ, "GEMINI_API_KEY": "test-key-123",
               "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(["unshare", "--mount", "--uts", "--fork",
                                      "--kill-child=SIGKILL", "--", "sh", "-c", inner],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    def supervisor_pid(self) -> int | None:
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(children.split()[0]) if children.split() else None

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM to the supervisor (the orderly stop), then unshare ends with it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.supervisor_pid()
        if pid:
            os.kill(pid, 15)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict, bytes]:
        url = path if path.startswith("http") else self.url + path
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()


def red_picture(jpeg: bytes) -> bool:
    """The JPEG decodes (FFmpeg) and its mean colour is the camera's red."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-f", "image2pipe", "-i", "-", "-vf",
                           "scale=1:1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          input=jpeg, capture_output=True, timeout=60)
    if proc.returncode != 0 or len(proc.stdout) != 3:
        return False
    r, g, b = proc.stdout
    return r > 200 and g < 60 and b < 60


def wait_for(check, timeout: float, what: str, boxes):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        for box in boxes:
            if box.proc.poll() is not None:
                raise AssertionError(f"{box.name} exited:\n{box.log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {b.name}\n{b.log_path.read_text()[-2000:]}" for b in boxes)
    raise AssertionError(f"{what}: not within {timeout} s\n{logs}")


def test_two_recording_boxes_and_an_analysis_only_box_share_one_queue(tmp_path, gemini,
                                                                       pg_url):
    gemini.looks = True  # solid red frames are a fire: every window has an incident
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with Receiver() as receiver:
        common = dict(pg_url=pg_url, gemini_url=gemini.base_url, hook=f"{receiver.url}/hook")
        a = Box(tmp_path, "box-a", data_dir, camera="cam-a", workers=0, **common).start()
        b = Box(tmp_path, "box-b", data_dir, camera="cam-b", workers=0, **common).start()
        c = Box(tmp_path, "box-c", data_dir, camera=None, workers=2, **common).start()
        boxes = [a, b, c]
        try:
            with Store(pg_url) as store:
                def each_camera_done(n: int):
                    done = store.reports.list_jobs(states=["completed"], results=False, limit=500)
                    cams = [j.camera_id for j in done]
                    return done if all(cams.count(cam) >= n for cam in ("cam-a", "cam-b")) \
                        else None
                wait_for(lambda: each_camera_done(2), 150, "two windows per camera", boxes)
                nodes = {n["name"]: n for n in store.nodes.all()}
                assert {n: (v["alive"], v["role"]) for n, v in nodes.items()} == {
                    "box-a": (True, "records"), "box-b": (True, "records"),
                    "box-c": (True, "analyses")}

                # Alerts: each incident sent by the box that recorded it, the snapshot on
                # that box's server.
                def alerts_from_both():
                    got = [r.json for r in receiver.delivered("/hook")
                           if isinstance(r.json, dict) and r.json.get("type") == "incident"]
                    return got if {p["camera_id"] for p in got} >= {"cam-a", "cam-b"} else None
                alerts = wait_for(alerts_from_both, 60, "an alert from each box", boxes)
                for camera, box in (("cam-a", a), ("cam-b", b)):
                    payload = next(p for p in alerts if p["camera_id"] == camera)
                    assert payload["snapshot_url"].startswith(box.url + "/api/incidents/")
                    # The recording box makes the picture from its own footage: on a loaded
                    # machine it may follow the alert by a few seconds.
                    def snapshot(url=payload["snapshot_url"], box=box):
                        try:
                            return box.get(url)
                        except urllib.error.HTTPError as error:
                            assert error.code == 404, error
                            return None
                    status, headers, body = wait_for(snapshot, 30, f"{camera}'s snapshot", boxes)
                    assert status == 200 and headers["Content-Type"] == "image/jpeg"
                    assert red_picture(body), f"{camera}: the snapshot is not the red camera"

                # One view: box A lists box B's incident; its clip plays from box B.
                _, _, body = a.get("/api/incidents?limit=200")
                listed = json.loads(body)["incidents"]
                theirs = [i for i in listed if i["camera_id"] == "cam-b"]
                assert theirs and theirs[0]["node"] == "box-b"
                assert theirs[0]["clip_url"].startswith(b.url + "/api/incidents/")
                clip = tmp_path / "clip.mp4"
                status, _, data = b.get(theirs[0]["clip_url"], timeout=120)
                clip.write_bytes(data)
                probe = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip), "-f", "null",
                                        "-"], capture_output=True, text=True, timeout=120)
                assert status == 200 and probe.returncode == 0, probe.stderr
                # ... and box A's own server hands it over (a console signed in there).
                status, headers, data = a.get(f"/api/incidents/{theirs[0]['id']}/clip.mp4",
                                              timeout=120)
                assert status == 200 and headers["Content-Type"] == "video/mp4"
                clip.write_bytes(data)
                probe = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip), "-f", "null",
                                        "-"], capture_output=True, text=True, timeout=120)
                assert probe.returncode == 0, probe.stderr
                _, _, picture = a.get(f"/api/incidents/{theirs[0]['id']}/snapshot.jpg")
                assert red_picture(picture)
                _, _, body = a.get("/api/nodes")
                assert {n["name"] for n in json.loads(body)["nodes"]} == {"box-a", "box-b",
                                                                          "box-c"}

                # Box B away for a minute: its windows wait, uncharged, and none fails.
                b.stop()
                assert not store.nodes.get("box-b")["alive"]
                time.sleep(60)
                waiting = [j for j in store.reports.list_jobs(states=["pending"], results=False)
                           if j.camera_id == "cam-b"]
                assert waiting, "box B's last window should wait for it"
                assert all(j.retry_count == 0 for j in waiting)
                assert store.reports.count_jobs(states=["failed"]) == 0
                b = Box(tmp_path, "box-b", data_dir, camera="cam-b", workers=0, **common)
                b.port = boxes[1].port
                b.config_path.write_text(boxes[1].config_path.read_text())
                boxes[1] = b.start()
                ids = {j.id for j in waiting}
                wait_for(lambda: all(store.reports.get(i).status == "completed" for i in ids), 120,
                         "box B's waiting windows completed after it returned", boxes)

                # Every window of both cameras completed, by the analysis-only box.
                jobs = store.reports.list_jobs(results=False, limit=1000)
                assert store.reports.count_jobs(states=["failed"]) == 0
                done = [j for j in jobs if j.status == "completed"]
                assert {j.camera_id for j in done} == {"cam-a", "cam-b"}
                assert all(j.worker_id.startswith("box-c-analyzer-") for j in done)
                assert {j.node for j in done} == {"box-a", "box-b"}
        finally:
            for box in boxes:
                box.stop()
