"""The HLS server's rules, over real files in a live directory (FFmpeg-free, fast)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from vlmguard.config import check_server_settings, load_config
from vlmguard.errors import ConfigError
from vlmguard.web import create_app
from vlmguard.layout import Layout
from vlmguard.livelist import carry_over, read_history, write_history

from helpers import make_config as base_config
from helpers import write_config

PLAYLIST = """#EXTM3U
#EXT-X-VERSION:6
#EXT-X-TARGETDURATION:2
#EXT-X-MEDIA-SEQUENCE:100
#EXT-X-INDEPENDENT-SEGMENTS
#EXTINF:2.000000,
#EXT-X-PROGRAM-DATE-TIME:2026-11-26T08:00:00.000+0000
seg-100.ts
#EXTINF:2.000000,
#EXT-X-PROGRAM-DATE-TIME:2026-11-26T08:00:02.000+0000
seg-101.ts
"""


def make_config(tmp_path, token=""):
    return base_config(tmp_path, token=token, storage="segment_seconds = 2", cameras=("cam1", "cam2"))


def fill_live(config, camera="cam1", age=0.0):
    live = Layout(config.data_dir).live(camera)
    live.mkdir(parents=True, exist_ok=True)
    (live / "index.m3u8").write_text(PLAYLIST)
    for n in (100, 101):
        (live / f"seg-{n}.ts").write_bytes(bytes(range(256)) * 40)
    stamp = time.time() - age
    os.utime(live / "index.m3u8", (stamp, stamp))
    return live


def fetch(config, method, path, **kwargs):
    """One request against the app; returns (status, headers, body bytes)."""
    async def go():
        async with TestClient(TestServer(create_app(config))) as client:
            response = await client.request(method, path, **kwargs)
            return response.status, response.headers, await response.read()
    return asyncio.run(go())


def test_playlist_headers_and_rewrite(tmp_path):
    config = make_config(tmp_path)
    fill_live(config)
    status, headers, body = fetch(config, "GET", "/live/cam1/index.m3u8",
                                  headers={"Origin": "http://127.0.0.1:9"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/vnd.apple.mpegurl")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9"  # a local player page
    text = body.decode()
    assert "#EXT-X-TARGETDURATION:2\n#EXT-X-START:TIME-OFFSET=-6\n" in text
    assert "#EXT-X-PROGRAM-DATE-TIME" in text and "#EXT-X-INDEPENDENT-SEGMENTS" in text
    status, headers, body = fetch(config, "HEAD", "/live/cam1/index.m3u8")
    assert status == 200 and body == b""


def test_target_duration_never_shrinks(tmp_path):
    config = make_config(tmp_path)
    live = fill_live(config)

    async def go():
        async with TestClient(TestServer(create_app(config))) as client:
            (live / "index.m3u8").write_text(PLAYLIST.replace("#EXTINF:2.000000,\n#EXT-X-PROGRAM-DATE-TIME:2026-11-26T08:00:02",
                                                              "#EXTINF:3.400000,\n#EXT-X-PROGRAM-DATE-TIME:2026-11-26T08:00:02"))
            first = await (await client.get("/live/cam1/index.m3u8")).text()
            (live / "index.m3u8").write_text(PLAYLIST)
            second = await (await client.get("/live/cam1/index.m3u8")).text()
            return first, second
    first, second = asyncio.run(go())
    assert "#EXT-X-TARGETDURATION:4\n" in first
    assert "#EXT-X-TARGETDURATION:4\n" in second


def test_segment_served_with_range_and_type(tmp_path):
    config = make_config(tmp_path)
    live = fill_live(config)
    status, headers, body = fetch(config, "GET", "/live/cam1/seg-100.ts")
    assert status == 200 and headers["Content-Type"] == "video/mp2t"
    assert body == (live / "seg-100.ts").read_bytes()
    status, headers, body = fetch(config, "GET", "/live/cam1/seg-100.ts",
                                  headers={"Range": "bytes=10-19"})
    assert status == 206 and body == bytes(range(10, 20))
    assert headers["Content-Range"] == "bytes 10-19/10240"


def test_offline_camera_is_503_with_retry_after(tmp_path):
    config = make_config(tmp_path)
    fill_live(config, age=60)
    status, headers, body = fetch(config, "GET", "/live/cam1/index.m3u8")
    assert status == 503 and headers["Retry-After"] == "2"
    assert b"offline" in body
    status, headers, _ = fetch(config, "GET", "/live/cam2/index.m3u8")  # never started
    assert status == 503


@pytest.mark.parametrize("path", [
    "/live/nope/index.m3u8",
    "/live/cam1/seg-999.ts",
    "/live/cam1/..%2f..%2fconfig.toml",
    "/live/cam1/%2e%2e/%2e%2e/config.toml",
    "/live/cam1/%2E%2E%2F%2E%2E%2Fconfig.toml",
    "/live/cam1/..%5c..%5cconfig.toml",
    "/live/cam1/%2fetc%2fpasswd",
    "/live/cam1//etc/passwd",
    "/live/../../config.toml",
    "/live/cam1/index.m3u8%00.ts",
    "/live/cam1/seg-1.ts",  # a symlink out of the live directory
])
def test_traversal_and_unknown_are_404_without_paths(tmp_path, path):
    config = make_config(tmp_path)
    live = fill_live(config)
    (live / "seg-1.ts").symlink_to(tmp_path / "config.toml")
    status, _, body = fetch(config, "GET", path)
    assert status == 404
    assert str(tmp_path) not in body.decode(errors="replace")
    assert b"[server]" not in body


def test_token_required_when_set(tmp_path):
    config = make_config(tmp_path, token="s3cret")
    fill_live(config)
    assert fetch(config, "GET", "/live/cam1/index.m3u8")[0] == 401
    assert fetch(config, "GET", "/live/cam1/index.m3u8?token=wrong")[0] == 401
    assert fetch(config, "GET", "/live/cam1/seg-100.ts")[0] == 401
    assert fetch(config, "GET", "/api/cameras")[0] == 401
    status, _, _ = fetch(config, "GET", "/live/cam1/index.m3u8",
                         headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    status, _, body = fetch(config, "GET", "/live/cam1/index.m3u8?token=s3cret")
    assert status == 200
    assert "seg-100.ts?token=s3cret\n" in body.decode()  # players without headers keep going
    assert fetch(config, "GET", "/live/cam1/seg-100.ts?token=s3cret")[0] == 200


def test_cors_preflight(tmp_path):
    config = make_config(tmp_path, token="s3cret")
    status, headers, _ = fetch(config, "OPTIONS", "/live/cam1/index.m3u8",
                               headers={"Origin": "http://other.example",
                                        "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in headers["Access-Control-Allow-Headers"]


def test_public_host_without_token_refused(tmp_path):
    config = load_config(write_config(tmp_path, """
        [server]
        host = "0.0.0.0"
        [[cameras]]
        id = "a"
        url = "lavfi:testsrc2"
    """))
    with pytest.raises(ConfigError, match="server.token: required when server.host"):
        check_server_settings(config)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_server_settings(load_config(write_config(
            tmp_path, f'[server]\nhost = "{host}"\n[[cameras]]\nid = "a"\nurl = "lavfi:x"\n')))


def ffmpeg_playlist(first: int, count: int) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2",
             f"#EXT-X-MEDIA-SEQUENCE:{first}"]
    for n in range(first, first + count):
        lines += ["#EXTINF:2.000000,", f"seg-{n}.ts"]
    return "\n".join(lines + ["#EXT-X-ENDLIST"]) + "\n"


def end_run(config, first: int, count: int, camera="cam1") -> int:
    """What the streamer does when an FFmpeg run that listed first..first+count-1 ends."""
    layout = Layout(config.data_dir)
    path = layout.live_history(camera)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = carry_over(read_history(path), ffmpeg_playlist(first, count), time.time(),
                         keep=config.storage.live_segments, stale_seconds=60)
    write_history(path, history)
    (layout.live(camera) / "index.m3u8").unlink(missing_ok=True)
    return history.next_sequence


def served(config) -> tuple[int, str]:
    status, _headers, body = fetch(config, "GET", "/live/cam1/index.m3u8")
    return status, body.decode()


def listed(text: str) -> list[int]:
    return [int(line[4:-3]) for line in text.splitlines() if line.startswith("seg-")]


def test_playlist_continues_across_ffmpeg_runs(tmp_path):
    config = make_config(tmp_path)
    live = Layout(config.data_dir).live("cam1")
    assert end_run(config, 100, 4) == 104
    # Between runs: the last run's segments, not a 503.
    status, text = served(config)
    assert status == 200 and listed(text) == [100, 101, 102, 103]
    assert "#EXT-X-ENDLIST" not in text and "#EXT-X-DISCONTINUITY\n" not in text
    (live / "index.m3u8").write_text(ffmpeg_playlist(104, 3).replace("#EXT-X-ENDLIST\n", ""))
    status, text = served(config)
    assert listed(text) == [101, 102, 103, 104, 105, 106]  # live_segments = 6
    assert "#EXT-X-MEDIA-SEQUENCE:101\n" in text
    assert text.index("#EXT-X-DISCONTINUITY\n") < text.index("seg-104.ts")
    assert text.index("#EXT-X-DISCONTINUITY\n") > text.index("seg-103.ts")
    assert "#EXT-X-DISCONTINUITY-SEQUENCE" not in text
    assert "#EXT-X-TARGETDURATION:2\n#EXT-X-START:TIME-OFFSET=-6\n" in text


def test_discontinuity_sequence_counts_runs_scrolled_off(tmp_path):
    config = make_config(tmp_path)
    live = Layout(config.data_dir).live("cam1")
    end_run(config, 100, 2)
    end_run(config, 102, 3)
    end_run(config, 105, 2)
    (live / "index.m3u8").write_text(ffmpeg_playlist(107, 2).replace("#EXT-X-ENDLIST\n", ""))
    status, text = served(config)
    # 100-101 scrolled off with the first discontinuity: the window starts in run 1.
    assert listed(text) == [103, 104, 105, 106, 107, 108]
    assert "#EXT-X-MEDIA-SEQUENCE:103\n#EXT-X-DISCONTINUITY-SEQUENCE:1\n" in text
    assert text.count("#EXT-X-DISCONTINUITY\n") == 2


def test_ended_runs_playlist_is_not_listed_twice(tmp_path):
    """The streamer writes the history before it removes the ended run's playlist."""
    config = make_config(tmp_path)
    live = Layout(config.data_dir).live("cam1")
    live.mkdir(parents=True)
    (live / "index.m3u8").write_text(ffmpeg_playlist(100, 3))
    layout = Layout(config.data_dir)
    write_history(layout.live_history("cam1"),
                  carry_over(read_history(layout.live_history("cam1")), ffmpeg_playlist(100, 3),
                             time.time(), keep=6, stale_seconds=60))
    status, text = served(config)
    assert listed(text) == [100, 101, 102]


def test_camera_offline_between_runs_answers_503(tmp_path):
    config = make_config(tmp_path)
    end_run(config, 100, 3)
    path = Layout(config.data_dir).live_history("cam1")
    write_history(path, dataclasses.replace(read_history(path), updated=time.time() - 600))
    assert served(config)[0] == 503
    # The next run carries on the numbering even though the old segments are dropped.
    assert end_run(config, 103, 0) == 103
    assert read_history(path).segments == ()
