"""Several boxes, one database: node names, the nodes table, jobs that know their node."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy

from vlmguard.config import load_config
from vlmguard.errors import ConfigError
from vlmguard.store.bundle import Store
from vlmguard.store.nodes import NodeInfo, Nodes, NodeTaken
from vlmguard.store.schema import nodes, schema_version

from helpers import wait_for, write_config

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
TOKEN = "shared-by-every-box-0123456789"


def node(name: str = "box-a", instance: str = "i1", cameras=("cam1",)) -> NodeInfo:
    return NodeInfo(name=name, instance=instance, public_url=f"http://{name}:8080",
                    role="records", cameras=tuple(cameras))


def test_node_name_defaults_to_the_host_name_and_is_checked(tmp_path):
    config = load_config(write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
    """))
    import socket
    assert config.node_name == socket.gethostname().split(".")[0]
    assert config.node_role == "analyses"  # no cameras, two analyzers by default
    named = load_config(write_config(tmp_path, """
        [daemon]
        node = "dock-2"
        [analysis]
        workers = 0
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    assert named.node_name == "dock-2" and named.node_role == "records"
    for bad in ("-x", "a b", "x" * 64, "a/b"):
        with pytest.raises(ConfigError, match="daemon.node: must be"):
            load_config(write_config(tmp_path, f'[daemon]\nnode = "{bad}"\n'))


def test_a_live_node_name_is_refused_a_stale_or_stopped_one_taken_over(store):
    nodes_ = store.nodes
    first = node(instance="first")
    nodes_.join(first)
    assert nodes_.heartbeat(first)
    with pytest.raises(NodeTaken, match="node name 'box-a' is held by another running"):
        nodes_.join(node(instance="second"))
    nodes_.leave(first)  # an orderly stop frees the name at once
    assert not nodes_.get("box-a")["alive"] and nodes_.get("box-a")["stopped"]
    nodes_.join(node(instance="second"))
    assert nodes_.get("box-a")["alive"]
    # A start that died without leaving: its heartbeat goes stale, and the name is free.
    with store.db.write() as conn:
        conn.execute(sqlalchemy.update(nodes).values(
            heartbeat_at=datetime.now(timezone.utc) - timedelta(minutes=5), stopped_at=None))
    assert not nodes_.get("box-a")["alive"]
    nodes_.join(node(instance="third"))
    # The start that lost its name hears so from its heartbeat, and does not steal it back.
    assert not nodes_.heartbeat(node(instance="second"))
    listed = nodes_.all()
    assert [(n["name"], n["alive"], n["cameras"]) for n in listed] == [("box-a", True, ["cam1"])]


def test_a_node_row_carries_its_cameras_and_their_prompts(store):
    """An analyzer on another box asks the model what the recording box would."""
    info = NodeInfo(name="dock", instance="i", public_url="http://dock:8080", role="both",
                    cameras=("cam1", "cam2"), prompts=("Loading bay.", ""))
    store.nodes.join(info)
    found = store.nodes.get("dock")
    assert found["cameras"] == ["cam1", "cam2"]
    assert found["prompts"] == {"cam1": "Loading bay.", "cam2": ""}


def test_a_restart_of_the_same_box_after_a_crash_takes_its_name_back(store, tmp_path):
    """Killed (its heartbeat still fresh), the box starts again on its data directory at
    once: the same box id, so not refused; another box with that name still is."""
    from vlmguard.store.nodes import box_id
    box = box_id(tmp_path)
    assert box_id(tmp_path) == box and (tmp_path / "node-id").exists()
    first = NodeInfo(name="dock", instance="crashed", public_url="http://dock:1", role="both",
                     cameras=(), box=box)
    store.nodes.join(first)
    store.nodes.join(NodeInfo(name="dock", instance="restarted", public_url="http://dock:1",
                                   role="both", cameras=(), box=box))
    assert not store.nodes.heartbeat(first)
    with pytest.raises(NodeTaken):
        store.nodes.join(NodeInfo(name="dock", instance="other", public_url="http://x:1",
                                       role="both", cameras=(), box=box_id(tmp_path / "..")))


def test_jobs_and_incident_deliveries_carry_the_recording_node(db_url):
    with Store(db_url, node="box-a") as store:
        job_id = store.queue.register("cam1", "/a/cam1.ts", T0, T0 + timedelta(seconds=60),
                                kind="window")
        assert store.reports.get(job_id).node == "box-a"
        claimed = Store(db_url, node="box-c")
        try:
            assert claimed.queue.claim("w").node == "box-a"
        finally:
            claimed.close()


def test_schema_8_database_gains_the_node_columns(db_url):
    """A database written before nodes existed is upgraded; its jobs have no node."""
    with Store(db_url) as store:
        old = store.queue.register("cam1", "/old.ts", T0, T0 + timedelta(seconds=60))
        with store.db.write() as conn:
            conn.exec_driver_sql("DROP TABLE nodes")
            conn.exec_driver_sql("ALTER TABLE analysis_jobs DROP COLUMN node")
            conn.exec_driver_sql("ALTER TABLE alert_deliveries DROP COLUMN node")
            conn.exec_driver_sql("UPDATE vlmguard_meta SET value = '8' "
                                 "WHERE key = 'schema_version'")
    with Store(db_url, node="box-a") as store:
        assert schema_version(store.db) == 9
        assert store.reports.get(old).node is None
        store.nodes.join(node())
        assert store.nodes.get("box-a")["role"] == "records"


@pytest.mark.e2e
def test_a_second_run_with_a_live_node_name_is_refused(tmp_path, pg_url):
    """Two boxes configured with the same node name on one database: the second start
    says so in one line and exits 2; the first keeps its row."""
    def config(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        from daemon import free_port
        return write_config(folder, f"""
            [daemon]
            node = "same"
            [server]
            port = {free_port()}
            [storage]
            data_dir = "{folder / 'data'}"
            [database]
            url = "{pg_url}"
            [analysis]
            workers = 0
        """)
    first = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config",
                              str(config("one"))], stderr=subprocess.PIPE, text=True)
    try:
        with Store(pg_url, create=False, lazy=True) as store:
            deadline = datetime.now() + timedelta(seconds=30)
            while datetime.now() < deadline:
                try:
                    store.db.ensure_ready()
                    if (found := store.nodes.get("same")) and found["alive"]:
                        break
                except Exception:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail("the first vlmguard never joined")
        second = subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config",
                                 str(config("two"))], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("vlmguard: node name 'same' is held by another running")
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(60)
    with Store(pg_url, create=False) as store:
        assert store.nodes.get("same")["stopped"]




def box(tmp_path, gemini, name: str, pg_url: str, *, workers: int, camera: bool):
    from daemon import RunningVlmguard
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return RunningVlmguard(folder, gemini.base_url, workers=workers, window_seconds=10,
                           daemon=f'node = "{name}"', extra=f'[database]\nurl = "{pg_url}"',
                           cameras=None if camera else "\n", server=f'token = "{TOKEN}"')


@pytest.mark.e2e
def test_an_analysis_only_box_analyses_windows_recorded_on_another(tmp_path, gemini, pg_url):
    """Box A records (0 analyzers), box C has no camera: every window A recorded ends
    completed by C, fetched over HTTP; A stopped, its windows wait (uncharged, not failed)
    and complete once it is back."""
    recorder = box(tmp_path, gemini, "box-a", pg_url, workers=0, camera=True).start()
    analyst = box(tmp_path, gemini, "box-c", pg_url, workers=1, camera=False).start()
    try:
        with Store(pg_url) as store:
            def completed():
                done = store.reports.list_jobs(states=["completed"], results=False)
                return done if len(done) >= 2 else None
            done = wait_for(completed, 120, "two windows completed", daemon=(recorder, analyst))
            assert {j.node for j in done} == {"box-a"}
            assert all(j.kind in ("window", "catchup", "merged") for j in done)
            fetched = [e for e in analyst.log_events()
                       if e.get("event") == "footage fetched from its node"]
            assert fetched and all(e["node"] == "box-a" and e["bytes"] > 10_000 for e in fetched)
            # The footage is the recording box's to give, with the boxes' token only.
            url = f"http://127.0.0.1:{recorder.port}/api/jobs/{done[0].id}/footage.mp4"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=30)
            assert refused.value.code == 401
            listed = {n["name"]: n for n in store.nodes.all()}
            assert listed["box-a"]["alive"] and listed["box-a"]["cameras"] == ["cam1"]
            assert listed["box-c"]["role"] == "analyses" and listed["box-c"]["cameras"] == []

            shown = subprocess.run([sys.executable, "-m", "vlmguard", "status", "--config",
                                    str(analyst.config_path)], capture_output=True, text=True,
                                   timeout=60).stdout
            assert "node      box-a: alive, records" in shown
            assert "node      box-c (this box): alive, analyses" in shown

            assert recorder.stop() == 0
            shown = subprocess.run([sys.executable, "-m", "vlmguard", "status", "--json",
                                    "--config", str(analyst.config_path)], capture_output=True,
                                   text=True, timeout=60).stdout
            import json
            nodes_seen = {n["name"]: n for n in json.loads(shown)["nodes"]}
            assert not nodes_seen["box-a"]["alive"] and nodes_seen["box-a"]["stopped"]
            def waiting():
                pending = store.reports.list_jobs(states=["pending"], results=False)
                return [j for j in pending if j.error_message is None
                        and j.started_at is None] or None
            # The stop registers the last window; C claims it, finds box-a down, puts it back.
            wait_for(lambda: any(e.get("event") == "footage on another node out of reach now, "
                                 "job put back" for e in analyst.log_events()), 60,
                     "a window put back while its node is down", daemon=analyst)
            held = waiting()
            assert held and all(j.retry_count == 0 for j in held)
            assert store.reports.count_jobs(states=["failed"]) == 0
            held_ids = {j.id for j in held}

            recorder = box(tmp_path, gemini, "box-a", pg_url, workers=0, camera=True).start()
            def all_done():
                return all(store.reports.get(i).status == "completed" for i in held_ids)
            wait_for(all_done, 120, "the held windows completed after box-a returned",
                     daemon=(recorder, analyst))
            assert store.reports.count_jobs(states=["failed"]) == 0
    finally:
        for running in (recorder, analyst):
            running.stop()


class Answering:
    """A tiny HTTP server on 127.0.0.1 that answers every GET with one status."""

    def __init__(self, status: int, body: bytes = b"x" * 2000):
        import http.server
        import threading
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.auth = self.headers.get("Authorization")
                outer.path = self.path
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.auth = self.path = None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status, outcome", [(200, "fetched"), (404, "fails"), (401, "waits"),
                                             (503, "waits")])
def test_fetching_footage_from_the_recording_node(tmp_path, status, outcome):
    """What the recording node answers decides the job: fetched, failed for good (the
    footage is gone there), or put back to wait (not the job's fault)."""
    from types import SimpleNamespace
    from vlmguard.node_footage import FootageAway, fetch_footage
    from vlmguard.vlm import AnalysisError
    server = Answering(status)
    job = SimpleNamespace(id=7, node="box-a")
    row = {"alive": True, "public_url": server.url, "last_seen_s": 1.0}
    try:
        if outcome == "fetched":
            path, size = fetch_footage(row, job, "tok", tmp_path / "f.mp4", 10_000)
            assert size == 2000 and path.read_bytes() == b"x" * 2000
            assert server.auth == "Bearer tok"
            with pytest.raises(AnalysisError, match="more than storage.ram_max_mb"):
                fetch_footage(row, job, "tok", tmp_path / "g.mp4", 1000)
        elif outcome == "fails":
            with pytest.raises(AnalysisError) as failed:
                fetch_footage(row, job, "tok", tmp_path / "f.mp4", 10_000)
            assert not failed.value.retryable and "footage gone on node box-a" in str(failed.value)
        else:
            with pytest.raises(FootageAway):
                fetch_footage(row, job, "tok", tmp_path / "f.mp4", 10_000)
    finally:
        server.close()


def test_a_node_down_or_unreachable_puts_the_job_back(tmp_path):
    from types import SimpleNamespace
    from daemon import free_port
    from vlmguard.node_footage import FootageAway, fetch_footage
    job = SimpleNamespace(id=7, node="box-a")
    with pytest.raises(FootageAway, match="box-a is down"):
        fetch_footage({"alive": False, "public_url": "http://x", "last_seen_s": 99.0}, job, "",
                      tmp_path / "f.mp4", 10_000)
    with pytest.raises(FootageAway, match="never joined"):
        fetch_footage(None, job, "", tmp_path / "f.mp4", 10_000)
    closed = {"alive": True, "public_url": f"http://127.0.0.1:{free_port()}", "last_seen_s": 1.0}
    with pytest.raises(FootageAway, match="unreachable"):
        fetch_footage(closed, job, "", tmp_path / "f.mp4", 10_000)


def test_another_box_live_video_passes_through_this_box(tmp_path):
    """GET /live/<camera>/... of another node's camera goes on to that node with the
    boxes' token and the LL-HLS blocking parameters; its answer comes back bounded; a
    node down is 503, a node refusing the token 502, a camera no node records 404."""
    import urllib.request as request_
    from helpers import free_port
    from helpers.http import serving
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    config = load_config(write_config(tmp_path, f"""
        [daemon]
        node = "box-a"
        [server]
        port = {free_port()}
        token = "{TOKEN}"
        [storage]
        data_dir = "{tmp_path / 'data'}"
        [database]
        url = "{url}"
        [analysis]
        workers = 0
    """))
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n"
    answering = {"dock-b": Answering(200, playlist), "dock-c": Answering(200),
                 "dock-d": Answering(401), "dock-e": Answering(200, b"x" * (1 << 20 + 1))}
    try:
        with Store(url) as store:
            for n, (camera, server) in enumerate(answering.items()):
                info = NodeInfo(name=f"box-{camera[-1]}", instance=f"i{n}",
                                public_url=server.url, role="records", cameras=(camera,))
                store.nodes.join(info)
                if camera == "dock-c":
                    store.nodes.leave(info)
        with serving(config) as port:
            def get(path: str, auth: bool = True):
                headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
                try:
                    with request_.urlopen(request_.Request(f"http://127.0.0.1:{port}{path}",
                                                           headers=headers), timeout=30) as got:
                        return got.status, got.read()
                except urllib.error.HTTPError as refused:
                    return refused.code, refused.read()

            status, body = get("/live/dock-b/index.m3u8?_HLS_msn=12&_HLS_part=3&_HLS_skip=YES"
                               "&other=1&token=" + TOKEN)
            assert (status, body) == (200, playlist)
            assert answering["dock-b"].auth == f"Bearer {TOKEN}"
            from urllib.parse import parse_qs, urlsplit
            asked = urlsplit(answering["dock-b"].path)
            assert asked.path == "/live/dock-b/index.m3u8"
            assert parse_qs(asked.query) == {"_HLS_msn": ["12"], "_HLS_part": ["3"],
                                             "_HLS_skip": ["YES"], "token": [TOKEN]}
            assert get("/live/dock-b/part-3-12.m4s")[0] == 200
            assert get("/live/dock-b/index.m3u8", auth=False)[0] == 401  # this box's sign-in
            status, body = get("/live/dock-c/index.m3u8")
            assert status == 503 and b"box-c" in body and b"down" in body
            status, body = get("/live/dock-d/index.m3u8")
            assert status == 502 and b"same token" in body
            status, body = get("/live/dock-e/index.m3u8")
            assert status == 502 and b"more than 1048576 bytes" in body
            assert get("/live/nowhere/index.m3u8")[0] == 404
            assert answering["dock-c"].path is None  # a node down is not asked
    finally:
        for server in answering.values():
            server.close()
