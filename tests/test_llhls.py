"""Low-Latency HLS packaging and serving, fed with real FFmpeg fMP4 (made faster than real
time, with a clock the test moves), and every consumer of the live segments it writes.
The real-time checks (hls.js in Chromium, players, an FFmpeg restart) are in
test_streamer.py on its shared daemon."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from vlmguard.jobvideo import mp4_copy
from vlmguard.clips import media_times
from vlmguard.ffmpeg import LIVE_MOVFLAGS, analysis_copy_command, media_duration, video_args
from vlmguard.fmp4 import children, fragment_timing, init_size, parse_init
from vlmguard.layout import Layout
from vlmguard.livelist import History, carry_over, live_segments, read_history
from vlmguard.llhls import LiveStream, Settings, part_plan
from vlmguard.web import create_app
from vlmguard.web.keys import LIVE_KEY
from vlmguard.windows import WindowCutter

from hls_rules import Violation, check_playlist, check_successor, parse
from helpers import make_config as base_config

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

RATE = 25


def fmp4(seconds: float = 6, rate: int = RATE, gop: float = 1.0, size: str = "320x240",
         codec: tuple[str, ...] = ("libx264", "-preset", "ultrafast", "-tune", "zerolatency")) -> bytes:
    """FFmpeg's low-latency live output (the streamer's movflags) for a test source."""
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i",
         f"testsrc2=size={size}:rate={rate}", "-t", str(seconds), "-c:v", *codec,
         "-pix_fmt", "yuv420p", "-g", "1000",
         "-force_key_frames", f"expr:gte(t,n_forced*{gop})", "-f", "mp4",
         "-movflags", LIVE_MOVFLAGS, "pipe:1"],
        capture_output=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def video() -> bytes:
    return fmp4()


def split(data: bytes):
    """(init section, moov, [(fragment, moof)]) as the pump groups FFmpeg's boxes."""
    boxes = [(kind, data[start - 8:end]) for kind, start, end in children(data, 0)]
    first = next(n for n, (kind, _) in enumerate(boxes) if kind == b"moof")
    moov = next(box for kind, box in boxes[:first] if kind == b"moov")
    fragments = []
    for n in range(first, len(boxes), 2):
        fragments.append((boxes[n][1] + boxes[n + 1][1], boxes[n][1]))
    return b"".join(box for _, box in boxes[:first]), moov, fragments


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def settings(**kwargs) -> Settings:
    values = {"segment_seconds": 1, "live_segments": 6, "part_seconds": 0.25} | kwargs
    return Settings(**values)


class Feed:
    """A LiveStream and the fragments of one FFmpeg run, handed over one at a time."""

    def __init__(self, live: Path, data: bytes, clock: Clock | None = None,
                 stream: LiveStream | None = None, **kwargs):
        live.mkdir(parents=True, exist_ok=True)
        self.clock = clock or Clock()
        self.stream = stream or LiveStream("cam1", live, settings(**kwargs), self.clock)
        self.init, self.moov, self.fragments = split(data)
        self.track = parse_init(self.moov)

    def start(self, run_start: int = 100, history: History = History()) -> None:
        self.stream.start_run(history, run_start)
        self.stream.add_init(self.init, self.moov)
        self.left = list(self.fragments)

    def step(self) -> bool:
        """One more frame, arriving one frame's duration after the last; False when done."""
        if not self.left:
            return False
        fragment, moof = self.left.pop(0)
        self.clock.now += fragment_timing(moof, self.track).duration / self.track.timescale
        self.stream.add_fragment(fragment, moof)
        return True

    def run(self, every: int = 1):
        """Feed the rest, yielding the stream every `every` frames."""
        n = 0
        while self.step():
            n += 1
            if n % every == 0:
                yield self.stream


def checked_sequence(feed: Feed, every: int = 1, previous=None):
    """Feed the whole run, checking each playlist and each against the one before."""
    for stream in feed.run(every):
        text = stream.playlist()
        if text is None:
            continue
        current = check_playlist(text)
        if previous is not None:
            check_successor(previous, current)
        previous = current
    return previous


def decoded_frames(path: Path) -> int:
    proc = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "null",
                           "-progress", "pipe:1", "-"], capture_output=True, text=True, timeout=60)
    found = re.findall(r"^frame=(\d+)$", proc.stdout, re.M)
    return int(found[-1]) if found else 0


# -- cutting -------------------------------------------------------------------------------

def test_part_target_is_whole_frames_near_the_asked_length():
    assert part_plan(0.04, 0.25, gop_frames=25) == 0.23  # 5 frames of 40 ms divide the GOP
    assert part_plan(0.04, 0.25) == 0.276  # 6 frames, no GOP known
    assert part_plan(1 / 30, 0.25, gop_frames=60) == 0.23  # 6 frames: 0.2 s, 10 to a GOP
    assert part_plan(1 / 30, 0.25) == 0.307  # 8 frames: 0.267 s
    assert part_plan(0.1, 0.25, gop_frames=20) == 0.23  # 10 fps: 2 frames
    assert part_plan(0.2, 0.25) == 0.23  # 5 fps: a frame a part
    assert part_plan(0.5, 0.25) == 0.575  # 2 fps still fits twice the asked length
    assert part_plan(1.0, 0.25) is None  # 1 fps: no parts


def test_every_playlist_keeps_the_rules_while_segments_and_parts_grow(tmp_path, video):
    feed = Feed(tmp_path / "live", video)
    feed.start()
    last = checked_sequence(feed)
    stream = feed.stream
    assert stream.part_target == 0.23
    # 1-s segments of five 0.2-s parts, each segment starting with a keyframe part.
    segments = [e for e in last.entries if e.uri]
    assert [round(e.duration, 3) for e in segments] == [1.0] * len(segments)
    assert len(segments) == 5 and last.entries[-1].uri is None  # the sixth is being written
    for entry in last.entries:
        assert [round(p.duration, 3) for p in entry.parts][:4] == [0.2] * min(4, len(entry.parts))
    # Parts are listed for (at least) the last three target durations, no further back.
    with_parts = [e for e in last.entries if e.parts]
    assert sum(p.duration for e in with_parts for p in e.parts) >= 3 * last.target
    assert sum(p.duration for e in with_parts[1:] for p in e.parts) < 3 * last.target
    assert [bool(e.parts) for e in segments] == [False, False, False, True, True]
    # Each segment file is a whole MP4 that plays alone: 25 frames, 1 s (its times are
    # the run's: FFmpeg reports its end as its duration).
    for entry in segments:
        path = tmp_path / "live" / entry.uri.replace(".m4s", ".mp4")
        assert decoded_frames(path) == RATE
        start, end = media_times("ffmpeg", path)
        assert end - start == pytest.approx(1.0, abs=0.05)
    assert (tmp_path / "live" / "init-100.mp4").read_bytes() == feed.init


def test_a_part_never_changes_place_and_its_bytes_are_the_segments(tmp_path, video):
    feed = Feed(tmp_path / "live", video)
    feed.start()
    seen = {}
    for stream in feed.run():
        for done in stream.done:
            for part in done.parts:
                data = stream.part_data(100, part.number)
                seen.setdefault(part.number, data)
                assert seen[part.number] == data
        if stream.open is not None:
            for part in stream.open.parts:
                seen.setdefault(part.number, stream.part_data(100, part.number))
    done = feed.stream.done[2]
    whole = done.path.read_bytes()
    assert whole[:init_size(done.path)] == feed.init
    assert b"".join(seen[p.number] for p in done.parts) == whole[len(feed.init):]


def test_an_ffmpeg_restart_continues_the_numbering_after_a_discontinuity(tmp_path, video):
    live = tmp_path / "live"
    first = Feed(live, video)
    first.start(run_start=100)
    first.fragments = first.fragments[:90]  # FFmpeg stops 3.6 s in, inside a segment
    first.left = list(first.fragments)
    previous = checked_sequence(first)
    first.stream.end_run()
    ended = check_playlist(first.stream.playlist())
    check_successor(previous, ended)
    # The ended run's last segment is closed with the parts it had: 0.6 s, three parts.
    assert ended.segments[-1].msn == 103 and round(ended.segments[-1].duration, 3) == 0.6
    assert ended.hint == "part-100-18.m4s"
    # The streamer carries the run over and starts the next one where it stopped.
    history = carry_over(History(next_sequence=100), (live / "index.m3u8").read_text(),
                         first.clock.now, keep=6, stale_seconds=10, now=first.clock.now)
    assert history.next_sequence == 104
    second = Feed(live, video, clock=first.clock, stream=first.stream)
    first.clock.now += 1.0
    second.start(run_start=history.next_sequence, history=history)
    between = check_playlist(second.stream.playlist())
    check_successor(ended, between)
    assert [s.msn for s in between.segments] == [100, 101, 102, 103]
    previous = between
    saw_parts_before_a_segment = False
    for stream in second.run():
        text = stream.playlist()
        current = check_playlist(text)
        check_successor(previous, current)
        previous = current
        if not stream.done and stream.open and stream.open.parts:
            saw_parts_before_a_segment = True
            # The new run's parts come after a discontinuity, with the new init section.
            tail = text[text.rindex("seg-103.m4s"):]
            assert tail.index("#EXT-X-DISCONTINUITY") < tail.index('#EXT-X-MAP:URI="init-104.mp4"') \
                < tail.index("#EXT-X-PART:")
    assert saw_parts_before_a_segment
    final = previous
    assert {s.discontinuity for s in final.segments if s.msn >= 104} == {1}
    assert all(s.init == "init-104.mp4" for s in final.segments if s.msn >= 104)
    msns = [s.msn for s in final.segments]
    assert msns == list(range(msns[0], msns[0] + len(msns)))


def test_hevc_is_cut_alike_and_tagged_as_apple_players_want(tmp_path):
    assert video_args(False, 2, "hevc") == ["-c:v", "copy", "-tag:v", "hvc1"]
    assert video_args(False, 2, "h264") == ["-c:v", "copy"]
    data = fmp4(seconds=3, codec=("libx265", "-x265-params", "log-level=error:bframes=0",
                                  "-tag:v", "hvc1"))
    feed = Feed(tmp_path / "live", data)
    feed.start()
    last = checked_sequence(feed)
    assert b"hvc1" in feed.init and feed.stream.part_target == 0.23
    assert [round(s.duration, 3) for s in last.segments] == [1.0, 1.0]
    assert decoded_frames(tmp_path / "live" / "seg-101.mp4") == RATE


def test_a_camera_with_too_few_frames_for_parts_gets_ordinary_segments(tmp_path):
    feed = Feed(tmp_path / "live", fmp4(seconds=4, rate=1, gop=1.0))
    feed.start()
    last = checked_sequence(feed)
    assert feed.stream.part_target is None and not last.parts and last.hint is None
    assert last.start is not None  # ordinary players' start point, as before
    assert "without parts" in feed.stream.health() and "1.00 s apart" in feed.stream.health()


def fmp4_with_hole(seconds: float = 7, first: int = 40, last: int = 99, gop: float = 1) -> bytes:
    """FFmpeg's live output when its live fifo dropped frames first..last (the streaming
    process did not read): the muxer stretches the frame before them over the hole, and
    the fifo starts again at a keyframe (here: frame 100, at 4 s)."""
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i",
         f"testsrc2=size=320x240:rate={RATE}", "-t", str(seconds),
         "-vf", f"select='not(between(n\\,{first}\\,{last}))'", "-fps_mode", "passthrough",
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
         "-g", "1000", "-force_key_frames", f"expr:gte(t,n_forced*{gop})", "-f", "mp4",
         "-movflags", LIVE_MOVFLAGS, "pipe:1"],
        capture_output=True, check=True, timeout=60).stdout


def test_a_long_frame_within_a_gop_is_the_cameras_and_kept(tmp_path):
    # Frames 5-34 missing, and no keyframe after them: not FFmpeg's fifo starting again.
    feed = Feed(tmp_path / "live", fmp4_with_hole(seconds=5, first=5, last=34, gop=2))
    feed.start(run_start=100)
    for _stream in feed.run():
        pass
    stream = feed.stream
    assert stream.holes == 0 and "gaps" not in stream.health()
    assert [round(d.segment.duration, 2) for d in stream.done] == [2.0, 2.0]  # 4 s in, unbroken
    assert {d.segment.discontinuity for d in stream.done} == {0}


def test_a_hole_in_the_live_video_is_a_discontinuity_and_every_listed_part_stays(tmp_path):
    live = tmp_path / "live"
    feed = Feed(live, fmp4_with_hole())
    feed.start(run_start=100)
    stretched = [n for n, (_data, moof) in enumerate(feed.fragments)
                 if fragment_timing(moof, feed.track).duration > 2 * feed.track.timescale]
    assert stretched == [39]  # the hole is in FFmpeg's output as the test means it
    last = checked_sequence(feed)  # every playlist keeps the rules, each after the one before
    stream = feed.stream
    assert stream.holes == 1 and round(stream.hole_seconds, 2) == 2.44
    assert stream.health() == "ll-hls (parts of up to 0.230 s); gaps in live video: 1 (2.4 s)"
    # 100: frames 0-24; 101: 25-38, cut short before the stretched frame; then the video
    # from the keyframe after the hole, after a discontinuity: 102 (4-5 s), 103 (and 104
    # being written).
    durations = {s.msn: round(s.duration, 2) for s in last.segments}
    assert durations == {100: 1.0, 101: 0.56, 102: 1.0, 103: 1.0}
    assert {s.msn: s.discontinuity for s in last.segments} == \
        {100: 0, 101: 0, 102: 1, 103: 1}
    text = stream.playlist()
    assert text.index("seg-101.m4s") < text.index("#EXT-X-DISCONTINUITY") < text.index("seg-102.m4s")
    assert decoded_frames(live / "seg-102.mp4") == RATE
    # The run's own playlist keeps the hole for what reads it (windows, the next run).
    history = carry_over(History(next_sequence=100), (live / "index.m3u8").read_text(),
                         feed.clock.now, keep=6, stale_seconds=10, now=feed.clock.now)
    assert [s.discontinuity for s in history.segments] == [0, 0, 1, 1]
    assert history.discontinuity == 2 and history.next_sequence == 104
    # Once the hole has left the run's playlist, its count still stands at the top.
    stream.settings = settings(live_segments=2)
    stream.write_run_playlist()
    history = carry_over(History(next_sequence=100), (live / "index.m3u8").read_text(),
                         feed.clock.now, keep=6, stale_seconds=10, now=feed.clock.now)
    assert [s.discontinuity for s in history.segments] == [1, 1]
    assert history.discontinuity == 2


def test_the_checker_catches_broken_playlists():
    good = """#EXTM3U
#EXT-X-VERSION:6
#EXT-X-TARGETDURATION:1
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.69
#EXT-X-PART-INF:PART-TARGET=0.23
#EXT-X-MEDIA-SEQUENCE:7
#EXT-X-MAP:URI="init-1.mp4"
#EXT-X-PART:DURATION=0.2,URI="p0.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.2,URI="p1.m4s"
#EXTINF:0.4,
seg-7.m4s
#EXT-X-PART:DURATION=0.2,URI="p2.m4s",INDEPENDENT=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI="p3.m4s"
"""
    check_playlist(good)
    for broken in (good.replace("DURATION=0.2,URI=\"p1", "DURATION=0.3,URI=\"p1"),
                   good.replace("DURATION=0.2,URI=\"p0", "DURATION=0.1,URI=\"p0"),
                   good.replace("PART-HOLD-BACK=0.69", "PART-HOLD-BACK=0.4"),
                   good.replace("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"p3.m4s\"\n", ""),
                   good.replace(",INDEPENDENT=YES\n#EXT-X-PRELOAD", "\n#EXT-X-PRELOAD"),
                   good.replace("#EXTINF:0.4,", "#EXTINF:1.6,"),
                   good.replace('#EXT-X-MAP:URI="init-1.mp4"\n', "")):
        with pytest.raises(Violation):
            check_playlist(broken)
    moved = good.replace("#EXT-X-MEDIA-SEQUENCE:7", "#EXT-X-MEDIA-SEQUENCE:8")
    with pytest.raises(Violation):
        check_successor(parse(good), parse(moved))


# -- serving -------------------------------------------------------------------------------

def make_config(tmp_path, token="", live_segments=6):
    return base_config(tmp_path, token=token,
                       storage=f"segment_seconds = 1\nlive_segments = {live_segments}")


class Served:
    """The HLS app with a LiveStream for cam1 that the test feeds frame by frame."""

    def __init__(self, tmp_path, video, **kwargs):
        self.config = make_config(tmp_path, **kwargs)
        live = Layout(self.config.data_dir).live("cam1")
        self.feed = Feed(live, video, live_segments=self.config.storage.live_segments)
        self.feed.stream.clock = time.time
        self.feed.clock.now = time.time()
        self.app = create_app(self.config)
        self.app[LIVE_KEY]["cam1"] = self.feed.stream
        self.feed.start()

    def frames(self, count: int) -> None:
        for _ in range(count):
            self.feed.step()

    async def client(self) -> TestClient:
        return TestClient(TestServer(self.app))


def run(coroutine):
    return asyncio.run(coroutine)


def test_blocking_reload_is_answered_the_moment_the_part_exists(tmp_path, video):
    served = Served(tmp_path, video)
    served.frames(60)  # 2.4 s: two segments and two parts of the third

    async def go():
        async with await served.client() as client:
            stream = served.feed.stream
            msn, index = stream.hint()
            arrived = {}

            async def camera():
                # Frames at real pace; note when each part is listed.
                while served.feed.left and len(arrived) < 6:
                    await asyncio.sleep(0.04)
                    before = stream.part_count
                    served.feed.step()
                    if stream.part_count > before:
                        arrived[stream.part_count - 1] = time.monotonic()

            feeding = asyncio.create_task(camera())
            answered = []
            for _ in range(5):
                response = await client.get(f"/live/cam1/index.m3u8?_HLS_msn={msn}&_HLS_part={index}")
                answered.append((time.monotonic(), await response.text()))
                assert response.status == 200
                listed = check_playlist(answered[-1][1])
                # The part asked for, or, past a segment's last part, the next one's first.
                assert (listed.parts[-1][0], listed.parts[-1][1]) in ((msn, index), (msn + 1, 0))
                msn, index = stream.hint()
            await feeding
            return answered, arrived

    answered, arrived = run(go())
    # Each answer came within a few ms of its part (one part is 0.2 s); the hint
    # always names the next part, so the n-th answer waited for the n-th new part.
    for (when, _text), number in zip(answered, sorted(arrived)):
        assert 0 <= when - arrived[number] < 0.05, (when - arrived[number])


def test_requests_the_spec_calls_bad_and_parts_by_their_names(tmp_path, video):
    served = Served(tmp_path, video)
    served.frames(110)
    stream = served.feed.stream

    async def go():
        async with await served.client() as client:
            last = stream.last_sequence()
            get = client.get
            for query in ("_HLS_part=1", "_HLS_msn=x", "_HLS_msn=-1", f"_HLS_msn={last}&_HLS_part=y",
                          f"_HLS_msn={last + 3}", f"_HLS_msn={last + 1}&_HLS_part=20"):
                response = await get(f"/live/cam1/index.m3u8?{query}")
                assert response.status == 400, query
            # Already there (and long gone) segments answer at once.
            started = time.monotonic()
            for query in (f"_HLS_msn={last}", "_HLS_msn=1", f"_HLS_msn={last}&_HLS_part=99"):
                response = await get(f"/live/cam1/index.m3u8?{query}")
                assert response.status == 200, query
            assert time.monotonic() - started < 0.5
            text = await (await get("/live/cam1/index.m3u8")).text()
            playlist = check_playlist(text)
            msn, n, part = playlist.parts[-1]
            body = await (await get(f"/live/cam1/{part.uri}")).read()
            assert body == stream.part_data(100, int(part.uri.split("-")[2].split(".")[0]))
            assert body.startswith(b"\x00\x00") and b"moof" in body[:8]
            # A finished segment: the file without its init section; the init from EXT-X-MAP.
            segment = playlist.segments[-1]
            body = await (await get(f"/live/cam1/{segment.uri}")).read()
            whole = (stream.live_dir / segment.uri.replace(".m4s", ".mp4")).read_bytes()
            assert body == whole[len(served.feed.init):]
            assert await (await get(f"/live/cam1/{segment.init}")).read() == served.feed.init
            assert (await get(f"/live/cam1/{segment.uri.replace('.m4s', '.mp4')}")).status == 200
            # A part no longer listed stays downloadable as long as its segment's file.
            assert "part-100-0.m4s" not in text
            assert (await get("/live/cam1/part-100-0.m4s")).status == 200
            (stream.live_dir / "seg-100.mp4").unlink()
            # Gone, never made, another run's, or further than the hint: 404.
            for name in ("part-100-0.m4s", "part-99-30.m4s", f"part-100-{stream.part_count + 3}.m4s",
                         "part-100-99999999999.m4s", "part-x-1.m4s", "seg-1.m4s", "init-7.mp4"):
                assert (await get(f"/live/cam1/{name}")).status == 404, name
            # The hinted part is answered once it is made.
            hinted = playlist.hint

            async def later():
                await asyncio.sleep(0.3)
                served.frames(6)

            feeding = asyncio.create_task(later())
            started = time.monotonic()
            response = await get(f"/live/cam1/{hinted}")
            waited = time.monotonic() - started
            await feeding
            assert response.status == 200 and 0.25 < waited < 1.0
            assert await response.read() == stream.part_data(100, int(hinted.split("-")[2].split(".")[0]))

    run(go())


def test_token_goes_on_every_uri_and_a_stale_stream_is_503(tmp_path, video):
    served = Served(tmp_path, video, token="sesame")
    served.frames(60)

    async def go():
        async with await served.client() as client:
            response = await client.get("/live/cam1/index.m3u8?token=sesame")
            text = await response.text()
            uris = re.findall(r'URI="([^"]+)"', text) + [line for line in text.splitlines()
                                                         if line and not line.startswith("#")]
            assert uris and all(uri.endswith("?token=sesame") for uri in uris)
            for uri in uris[:3]:
                assert (await client.get(f"/live/cam1/{uri}")).status == 200
            assert (await client.get("/live/cam1/index.m3u8")).status == 401
            served.feed.stream.fresh_at -= 60
            response = await client.get("/live/cam1/index.m3u8?token=sesame")
            assert response.status == 503 and response.headers["Retry-After"]

    run(go())


def test_a_long_playlist_offers_delta_updates(tmp_path):
    served = Served(tmp_path, fmp4(seconds=11), live_segments=9)
    served.frames(250)
    stream = served.feed.stream

    async def go():
        async with await served.client() as client:
            full = check_playlist(await (await client.get("/live/cam1/index.m3u8")).text())
            assert full.server_control["CAN-SKIP-UNTIL"] == "6"
            text = await (await client.get(
                f"/live/cam1/index.m3u8?_HLS_msn={stream.last_sequence()}&_HLS_skip=YES")).text()
            delta = check_playlist(text)
            return full, delta

    full, delta = run(go())
    assert delta.skipped == 3 and delta.version >= 9
    assert [s.uri for s in delta.segments] == [s.uri for s in full.segments][3:]
    assert sum(s.duration for s in delta.segments) >= 6
    assert delta.segments[0].init is not None  # EXT-X-MAP still precedes what is listed


# -- everything that reads live segments ---------------------------------------------------

def test_live_segments_in_either_container(tmp_path, video):
    layout = Layout(tmp_path / "data")
    feed = Feed(layout.live("cam1"), video)
    feed.start()
    list(feed.run())
    assert [s.sequence for s in live_segments(layout, "cam1")] == list(range(100, 105))
    feed.stream.end_run()  # FFmpeg ended: the segment it was writing is closed as it is
    found = live_segments(layout, "cam1")
    assert [s.sequence for s in found] == list(range(100, 106))
    assert all(s.container == "mp4" and s.init == layout.live("cam1") / "init-100.mp4"
               and s.path.is_file() and s.duration == pytest.approx(1.0) for s in found)
    starts = [s.start for s in found]
    assert all(b - a == pytest.approx(1.0, abs=0.01) for a, b in zip(starts, starts[1:]))
    assert init_size(found[0].path) == len(feed.init)
    # MPEG-TS (low_latency off): FFmpeg's own playlist and files.
    live = layout.live("cam2")
    live.mkdir(parents=True)
    (live / "index.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n"
        "#EXTINF:2.000000,\n#EXT-X-PROGRAM-DATE-TIME:2026-11-26T08:00:00.000+0000\nseg-7.ts\n")
    (live / "seg-7.ts").write_bytes(b"\x47" * 188)
    [segment] = live_segments(layout, "cam2")
    assert (segment.container, segment.init, segment.sequence) == ("ts", None, 7)
    assert segment.start == 1795680000.0


def test_a_window_of_fmp4_segments_is_joined_reduced_and_measured(tmp_path, video):
    layout = Layout(tmp_path / "data")
    layout.make_dirs("cam1")
    feed = Feed(layout.live("cam1"), fmp4(seconds=8))
    feed.clock.now = (time.time() // 10) * 10 - 20 - 0.2  # the run starts just before a 10-s boundary
    feed.start()
    registered = []
    cutter = WindowCutter(layout, "cam1", 10, 5,
                          lambda clip, *rest: registered.append(clip) or len(registered))
    for _stream in feed.run(every=25):  # the archiver looks about once a second
        cutter.step(now=feed.clock.now)
    cutter.step(now=feed.clock.now + 60)
    clips = sorted(registered)
    assert len(clips) == 2  # 0.2 s before the boundary (a window of its own), then the rest
    clip = clips[-1]
    assert clip.read_text().count("file 'seg-") >= 6
    seconds = media_duration("ffmpeg", clip)
    # analysis mode "original": the window's segments joined into one MP4, copied.
    joined = mp4_copy("ffmpeg", clip, tmp_path / "original.mp4")
    assert decoded_frames(joined) == round(seconds * RATE)
    # mode "reduced": the keyframe copy the model sees.
    target = tmp_path / "analysis.mp4"
    subprocess.run(analysis_copy_command("ffmpeg", clip, target, 1.0, 144), check=True,
                   capture_output=True, timeout=60)
    assert decoded_frames(target) >= seconds - 1


def test_waiting_for_a_segment_or_a_part_past_its_last_wakes_in_the_parts_order(tmp_path, video):
    served = Served(tmp_path, video)
    served.frames(30)  # segment 101 open with a part
    stream = served.feed.stream
    assert stream.open.sequence == 101

    async def go():
        answered = {}

        async def wait(name, msn, part):
            assert await stream.wait_for(msn, part, 5)
            answered[name] = (stream.last_sequence(), stream.hint())

        waiting = [asyncio.create_task(wait("past the last part", 101, 5)),
                   asyncio.create_task(wait("the whole segment", 101, None)),
                   asyncio.create_task(wait("part 2", 101, 2))]
        await asyncio.sleep(0)
        for _ in range(30):
            served.frames(1)
            await asyncio.sleep(0)
        await asyncio.gather(*waiting)
        assert len(stream.waiters) == 0
        return answered

    answered = run(go())
    # Part 2 first; the segment when its last part closed; "part 5" of a five-part
    # segment is part 0 of the next, answered once that exists.
    assert answered["part 2"] == (100, (101, 3))
    assert answered["the whole segment"] == (101, (102, 0))
    assert answered["past the last part"] == (101, (102, 1))
