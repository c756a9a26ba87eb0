"""An analysis process: claim a job, prepare the video, ask the model, store the result.

claim -> prepare -> generate -> check -> complete, with the lease heartbeated from a side
thread through every step. Account-wide trouble (bad key, daily quota, retired model)
pauses every analyzer through a row in the database, and one of them probes now and then
until it clears; a per-minute rate limit makes them all wait its retryDelay. Runs at low CPU and I/O priority so preparing
video never takes time from the live stream. Any failure becomes a job state with an
error_message; nothing in here is allowed to end the process but a signal.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import structlog

from vlmguard.config import AnalysisConfig, Config
from vlmguard.errors import LeaseLost, VlmguardError
from vlmguard.ffmpeg import (analysis_copy_command, child_env, count_frames, ffmpeg_binary,
                             media_duration)
from vlmguard.health import Beat, write_state
from vlmguard.logs import configure_logging, get_logger
from vlmguard.store import IncidentRecord, Job, JobStore, Outcome, Pause, utcnow
from vlmguard.vlm import (AccountProblem, AnalysisError, Answer, Clip, Finding, RateLimited,
                          VlmClient, build_prompt, check_answer)
from vlmguard.vlm.gemini import PROVIDER, GeminiClient, find_api_key, where_keys_come_from

log = get_logger("vlmguard.analyzer")

NO_KEY_RECHECK_SECONDS = 10.0
PAUSE_RECHECK_SECONDS = 1.0  # how soon a paused worker sees a SIGHUP probe or a resume
IOPRIO_CLASS_BE, IOPRIO_WHO_PROCESS = 2, 1
# ioprio_set has no libc wrapper, and its system call number differs per architecture.
SYS_IOPRIO_SET = {"x86_64": 251, "amd64": 251, "aarch64": 30, "arm64": 30, "armv7l": 314,
                  "armv6l": 314, "i386": 289, "i686": 289}
NICENESS = 10


class Stopping(Exception):
    """SIGTERM arrived while a job was in the model's hands: hand the job back."""


def worker_name(index: int) -> str:
    return f"{socket.gethostname()}-analyzer-{index}"


def main(config: Config, index: int, beat: Beat = Beat()) -> None:
    """Entry point of analysis process number index."""
    configure_logging("analyzer")
    lower_priority()
    worker_id = worker_name(index)
    structlog.contextvars.bind_contextvars(worker_id=worker_id)
    with JobStore.from_config(config) as store:
        worker = Worker(config, store, worker_id, beat=beat, state_name=f"analyzer-{index}")
        signal.signal(signal.SIGTERM, worker.on_signal)
        worker.run()
    log.info("analyzer stopped")


def lower_priority() -> None:
    """nice 10 and the lowest best-effort I/O class; FFmpeg children inherit both."""
    try:
        os.nice(NICENESS)
    except OSError:
        log.warning("cannot lower CPU priority")
    number = SYS_IOPRIO_SET.get(platform.machine().lower())
    if number is None:
        log.info("I/O priority left as is: ioprio_set's number is unknown here",
                 machine=platform.machine())
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(number, IOPRIO_WHO_PROCESS, 0, (IOPRIO_CLASS_BE << 13) | 7) != 0:
            log.warning("cannot lower I/O priority", error=os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError):
        pass  # not Linux: CPU niceness still applies


def gemini_client_factory(config: Config) -> Callable[[], VlmClient | None]:
    """Returns the client for the current key: the same one while the key stays the same
    (the worker asks every loop), a new one when the key was added or rotated."""
    made: dict[str, VlmClient] = {}

    def make() -> VlmClient | None:
        key = find_api_key(config.gemini)
        if key is None:
            return None
        if key not in made:
            made.clear()
            made[key] = GeminiClient(config.gemini, key,
                                     media_resolution=config.analysis.media_resolution)
        return made[key]
    return make


class Worker:
    def __init__(self, config: Config, store: JobStore, worker_id: str, *,
                 make_client: Callable[[], VlmClient | None] | None = None,
                 beat: Beat = Beat(), state_name: str | None = None):
        self.config = config
        self.store = store
        self.worker_id = worker_id
        self.make_client = make_client or gemini_client_factory(config)
        self.binary = ffmpeg_binary()
        self.beat = beat
        self.state_name = state_name
        self.stopping = threading.Event()
        self.interruptible = False
        self._state = "starting"

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state and self.state_name:
            write_state(self.config.data_dir, self.state_name,
                        {"worker_id": self.worker_id, "state": value, "since": time.time()})
        self._state = value

    def keep_alive(self, lease: "LeaseKeeper") -> Callable[[], None]:
        def check() -> None:
            self.beat()
            lease.check()
        return check

    def on_signal(self, signum, _frame) -> None:
        self.stopping.set()
        if self.interruptible:
            raise Stopping(signal.Signals(signum).name)

    def run(self) -> None:
        warned = False
        while not self.stopping.is_set():
            self.beat()
            client = self.make_client()
            if client is None:
                # Jobs stay pending: nothing fails, nothing spins; status says why.
                self.state = f"waiting: no Gemini API key ({where_keys_come_from(self.config.gemini)})"
                if not warned:
                    log.warning("no Gemini API key, not taking jobs",
                                looked_in=where_keys_come_from(self.config.gemini))
                    warned = True
                self.stopping.wait(NO_KEY_RECHECK_SECONDS)
                continue
            warned = False
            if self.held_back(client):
                continue
            self.state = "idle"
            job = self.store.next_job(self.worker_id, timeout=1.0)
            if job is not None:
                self.process(job, client)

    def held_back(self, client: VlmClient) -> bool:
        """True while the provider is paused or rate-limited (this call waited a little)."""
        shared = self.store.provider_state(PROVIDER)
        if shared is None:
            return False
        now = utcnow()
        if shared.paused:
            self.state = (f"paused: {shared.reason}: {shared.detail} "
                          f"(next probe {shared.probe_at:%H:%M:%S} UTC)")
            if self.store.take_probe(PROVIDER, self.probe_interval):
                self.probe(client, shared)
            else:
                self.store.watcher().wait(PAUSE_RECHECK_SECONDS)
            return True
        if shared.not_before is not None and shared.not_before > now:
            self.state = f"waiting: rate limited until {shared.not_before:%H:%M:%S} UTC"
            self.stopping.wait(min((shared.not_before - now).total_seconds(),
                                   PAUSE_RECHECK_SECONDS))
            return True
        return False

    @property
    def probe_interval(self) -> float:
        return self.config.gemini.pause_probe_minutes * 60

    def probe(self, client: VlmClient, shared: Pause) -> None:
        self.interruptible = True  # a probe may wait on Gemini as long as a job does
        try:
            client.probe()
        except Stopping:
            return
        except AccountProblem as exc:
            self.store.pause(PROVIDER, exc.reason, str(exc), self.probe_interval)
            log.warning("probe: still paused", reason=exc.reason, error=str(exc))
            return
        except (AnalysisError, RateLimited) as exc:
            log.warning("probe inconclusive, still paused", error=str(exc))
            return
        finally:
            self.interruptible = False
        if self.store.resume(PROVIDER):
            log.info("probe succeeded, analysis resumed", was=shared.reason)

    def pause_all(self, job: Job, problem: AccountProblem) -> None:
        self.store.pause(PROVIDER, problem.reason, str(problem), self.probe_interval)
        log.error("analysis paused for every analyzer", reason=problem.reason,
                  error=str(problem), probe_in_s=self.probe_interval)
        self.put_back(job)

    def wait_all(self, job: Job, limited: RateLimited) -> None:
        self.store.hold_off(PROVIDER, limited.retry_after)
        log.warning("rate limited, every analyzer waits", seconds=limited.retry_after)
        self.put_back(job, utcnow() + timedelta(seconds=limited.retry_after))

    def put_back(self, job: Job, until=None) -> None:
        try:
            self.store.defer(job, until)
        except LeaseLost:
            log.warning("lease lost, job not put back")

    def process(self, job: Job, client: VlmClient) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job.id, camera_id=job.camera_id):
            self.state = f"job {job.id}"
            log.info("job claimed", video=job.video_path, attempt=job.retry_count + 1)
            lease = LeaseKeeper(self.store, job)
            workdir = Path(tempfile.mkdtemp(prefix=f"vlmguard-job{job.id}-"))
            try:
                with lease:
                    outcome = self.analyze(job, client, workdir, self.keep_alive(lease))
                self.store.complete(job, outcome)  # checks the lease itself
                log.info("job completed", safety_score=outcome.safety_score,
                         incidents=len(outcome.incidents), tokens=outcome.total_tokens)
            except Stopping:
                self.hand_back(job)
            except AccountProblem as exc:
                self.pause_all(job, exc)
            except RateLimited as exc:
                self.wait_all(job, exc)
            except LeaseLost:
                log.warning("lease lost, job dropped without writing")
            except AnalysisError as exc:
                self.record_failure(job, str(exc), permanent=not exc.retryable,
                                    retry_after=exc.retry_after)
            except Exception as exc:  # a bug must fail one job, not the worker
                log.exception("unexpected error")
                self.record_failure(job, f"unexpected error: {type(exc).__name__}: {exc}")
            finally:
                self.interruptible = False
                shutil.rmtree(workdir, ignore_errors=True)
                self.state = "idle"

    def analyze(self, job: Job, client: VlmClient, workdir: Path,
                keep_alive: Callable[[], None]) -> Outcome:
        clip = prepare_clip(self.binary, self.config.analysis, Path(job.video_path), workdir)
        keep_alive()
        camera = self.config.camera(job.camera_id)
        prompt = build_prompt(camera.prompt if camera else "", clip)
        self.interruptible = True
        try:
            answer = client.analyze(clip, prompt, keep_alive)
        finally:
            self.interruptible = False
        finding = check_answer(answer.data, clip_duration(job, clip), clip.frame_interval_s,
                               log=log.warning)
        incidents = [IncidentRecord(
            start_at=job.segment_start + timedelta(seconds=i["start_offset_s"]),
            end_at=job.segment_start + timedelta(seconds=i["end_offset_s"]),
            category=i["category"], severity=i["severity"], description=i["description"],
            confidence=i["confidence"]) for i in finding.incidents]
        result = {"safety_score": finding.safety_score, "summary": finding.summary,
                  "incidents": list(finding.incidents)}
        return Outcome(result=result, safety_score=finding.safety_score, incidents=incidents,
                       prompt_tokens=answer.prompt_tokens, output_tokens=answer.output_tokens,
                       total_tokens=answer.total_tokens, thoughts_tokens=answer.thoughts_tokens,
                       model_version=answer.model_version)

    def hand_back(self, job: Job) -> None:
        try:
            self.store.release(job)
            log.info("job handed back on stop")
        except LeaseLost:
            pass

    def record_failure(self, job: Job, error: str, *, permanent: bool = False,
                       retry_after: float | None = None) -> None:
        try:
            status = self.store.fail(job, error, permanent=permanent, retry_after=retry_after)
        except LeaseLost:
            log.warning("lease lost, failure not recorded", error=error)
            return
        log.warning("job failed", error=error, status=status, permanent=permanent)


def prepare_clip(binary: str, analysis: AnalysisConfig, source: Path, workdir: Path) -> Clip:
    """The video the model will see: the reduced copy, or the archive itself."""
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise AnalysisError(f"archive missing: {source}", retryable=False) from None
    if size == 0:
        raise AnalysisError(f"archive is empty (0 bytes): {source}", retryable=False)
    duration = media_duration(binary, source)
    if not duration:
        raise AnalysisError(f"archive is not readable video: {source}", retryable=False)
    if analysis.mode == "original":
        return Clip(source, duration, analysis.fps,
                    "video/mp4" if source.suffix == ".mp4" else "video/mp2t")
    target = workdir / "analysis.mp4"
    proc = subprocess.run(analysis_copy_command(binary, source, target, analysis.fps,
                                                analysis.height),
                          capture_output=True, text=True, timeout=1800, env=child_env())
    if proc.returncode != 0 or not target.exists():
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise AnalysisError(f"archive could not be prepared (corrupt?): {reason}",
                            retryable=False)
    return Clip(target, duration, copy_fps(binary, target, duration, analysis.fps))


def copy_fps(binary: str, copy: Path, duration: float, most: float) -> float:
    """The copy's real frame rate: a camera with a 4-s GOP gives 0.25 fps whatever was
    asked, and telling the model more would bill it for duplicate frames."""
    frames = count_frames(binary, copy)
    if not frames or duration <= 0:
        return most
    return round(min(frames / duration, most), 4)


def analyze_file(config: Config, source: Path, camera_id: str | None) -> tuple[Finding, Answer]:
    """One file, analysed now and nothing stored: for tuning prompts (`vlmguard analyze`)."""
    client = gemini_client_factory(config)()
    if client is None:
        raise VlmguardError(f"no Gemini API key: set {where_keys_come_from(config.gemini)}")
    camera = config.camera(camera_id) if camera_id else None
    if camera_id and camera is None:
        raise VlmguardError(f"no camera {camera_id!r} in {config.source}")
    workdir = Path(tempfile.mkdtemp(prefix="vlmguard-analyze-"))
    try:
        clip = prepare_clip(ffmpeg_binary(), config.analysis, source, workdir)
        answer = client.analyze(clip, build_prompt(camera.prompt if camera else "", clip),
                                lambda: None)
        return check_answer(answer.data, clip.duration_s, clip.frame_interval_s), answer
    except (AnalysisError, AccountProblem, RateLimited) as exc:
        raise VlmguardError(str(exc)) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def clip_duration(job: Job, clip: Clip) -> float:
    return max(job.duration_seconds, clip.duration_s)


class LeaseKeeper:
    """Heartbeats the job's lease from a thread; check() raises once the lease is lost."""

    def __init__(self, store: JobStore, job: Job):
        self.store = store
        self.job = job
        self.interval = max(store.lease_seconds / 3, 0.2)
        self.done = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True, name=f"lease-{job.id}")

    def beat(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.store.heartbeat(self.job)
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:  # the database is briefly away: keep trying
                log.warning("heartbeat failed", error=str(exc))

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job.id}")

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.check()
