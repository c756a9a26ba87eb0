"""An analysis process: claim a job, prepare the video, ask the model, store the result.

claim -> prepare -> (static? store "no activity") -> ask the providers in order -> check ->
complete, with the lease heartbeated from a side thread through every step. A provider
that is down, times out, answers 429/5xx, refuses the request (400), answers something
unusable or is paused hands the job to the next one in the camera's list; which one
answered is stored with the result. Account-wide trouble (bad key, daily quota, retired
model) pauses that provider for every analyzer through a row in the database, and one of
them probes now and then until it clears; so does the same 400 on several windows in a
row (the provider is misconfigured: a 400 is about its setup, not the footage, until it
answers other windows). A per-minute rate limit makes them all wait its retry delay
(bounded by the provider's max_retry_wait_seconds). Providers are reached only through
vlm.registry. Runs at low CPU and I/O priority so preparing video never takes time from
the live stream. Any failure becomes a job state with an error_message; nothing in here
is allowed to end the process but a signal.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import structlog

from vlmguard.clips import complete_with_snapshots
from vlmguard.config import AnalysisConfig, Config
from vlmguard.errors import LeaseLost, VlmguardError, first_line
from vlmguard.ffmpeg import (analysis_copy_command, child_env, count_frames,
                             distinct_frames_command, ffmpeg_binary, frame_offsets,
                             last_line, media_duration, still_video_command)
from vlmguard.child import ChildState, on_stop
from vlmguard.health import Beat
from vlmguard.jobvideo import job_video, mp4_copy
from vlmguard.layout import Layout
from vlmguard.logs import configure_logging, get_logger
from vlmguard.node_footage import FootageAway, fetch_footage
from vlmguard.outage import Outage
from vlmguard.store.database import Database
from vlmguard.store.engines import is_outage
from vlmguard.store.nodes import Nodes
from vlmguard.store.outbox import Outbox
from vlmguard.store.pauses import Pauses
from vlmguard.store.queue import JobQueue
from vlmguard.store.records import IncidentRecord, Job, Outcome, Pause, utcnow
from vlmguard.vlm import (TOKEN_FIELDS, AccountProblem, AnalysisError, Answer, Clip, Finding,
                          Frame, RateLimited, VlmClient, build_prompt, check_answer, token_fields,
                          where_keys_come_from)
from vlmguard.vlm import registry

log = get_logger("vlmguard.analyzer")

NO_KEY_RECHECK_SECONDS = 10.0
PAUSE_RECHECK_SECONDS = 1.0  # how soon a paused worker sees a SIGHUP probe or a resume
IOPRIO_CLASS_BE, IOPRIO_WHO_PROCESS = 2, 1
# ioprio_set has no libc wrapper, and its system call number differs per architecture.
SYS_IOPRIO_SET = {"x86_64": 251, "amd64": 251, "aarch64": 30, "arm64": 30, "armv7l": 314,
                  "armv6l": 314, "i386": 289, "i686": 289}
NICENESS = 10
NO_ACTIVITY = "no activity"
# Incidents of adjacent windows merge when their times are this many frame intervals
# apart or closer: one interval, plus a quarter for keyframe jitter at the window edge.
MERGE_FRAME_INTERVALS = 1.25
# A job whose providers are all paused goes back for this long (the worker keeps
# taking other cameras' jobs if their providers answer).
PAUSED_DEFER_SECONDS = 5.0
# The same 400 from a provider on this many different windows in a row, with no answer
# between: its setup is wrong, not the footage. It is put aside like a paused provider.
MISCONFIGURED_AFTER = 3
MISCONFIGURED = "misconfigured"
REMEMBERED_REJECTIONS = 1000


class Stopping(BaseException):
    """SIGTERM arrived while a job was in the model's hands: hand the job back. A
    BaseException, so that no `except Exception` in an SDK turns it into its own error."""


class Rejections:
    """One provider's run of the same 400 on different windows, with no answer between."""

    def __init__(self, key: str):
        self.key = key
        self.jobs: set[int] = set()


def rejection_key(error: str) -> str:
    """A 400's message with its numbers blanked: the same refusal of another window."""
    return re.sub(r"\d+", "#", error)


class NoProvider(Exception):
    """Every provider of the job is paused, rate-limited or has no key: the job goes back
    uncharged, until not_before when a rate limit says when."""

    def __init__(self, message: str, until=None):
        super().__init__(message)
        self.until = until


def worker_name(index: int) -> str:
    return f"{socket.gethostname()}-analyzer-{index}"


def main(config: Config, index: int, beat: Beat = Beat()) -> None:
    """Entry point of analysis process number index."""
    configure_logging("analyzer")
    lower_priority()
    worker_id = worker_name(index)
    structlog.contextvars.bind_contextvars(worker_id=worker_id)
    with Database.from_config(config, lazy=True) as db:
        # The outbox rides along: a job's alerts are written in the transaction that
        # stores its incidents (JobQueue.complete), the notifier sends them.
        outbox = Outbox.from_config(db, config)
        queue = JobQueue.from_config(db, config, alongside_complete=outbox.enqueue_deliveries)
        worker = Worker(config, queue, Pauses(db), worker_id, beat=beat,
                        state_name=f"analyzer-{index}")
        on_stop(worker.stop)
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


def client_makers(config: Config) -> dict[str, Callable[[], VlmClient | None]]:
    return {p.name: registry.client_maker(p) for p in config.providers}


class Worker:
    def __init__(self, config: Config, queue: JobQueue, pauses: Pauses, worker_id: str, *,
                 beat: Beat = Beat(), state_name: str | None = None):
        self.config = config
        self.queue = queue
        self.pauses = pauses  # shared by every analyzer: a provider's pause, its rate limit
        self.db = queue.db
        self.worker_id = worker_id
        self.makers = client_makers(config)
        self.binary = ffmpeg_binary()
        self.beat = beat
        self.state_name = state_name
        self.published = ChildState(config.data_dir, state_name)
        self.stopping = threading.Event()
        self.interruptible = False
        self._state = "starting"
        self.since = time.time()
        self.warned_keys: set[str] = set()
        self.outage = Outage(state_name or worker_id)
        # Per provider: the current run of the same 400, what it has adapted to (as its
        # client reports), and when it last answered (time.monotonic()).
        self.rejections: dict[str, Rejections] = {}
        self.adapted: dict[str, dict[str, str]] = {}
        self.answered_at = 0.0
        # Jobs put back uncharged after every provider refused them (job id -> when).
        self.rejected_jobs: dict[int, float] = {}

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        changed = value != self._state
        self._state = value
        if changed:
            self.since = time.time()
            self.write_state()

    def write_state(self) -> None:
        self.published.publish({"worker_id": self.worker_id, "state": self._state,
                                "since": self.since, "adapted": self.adapted})

    def keep_alive(self, lease: "LeaseKeeper") -> Callable[[], None]:
        def check() -> None:
            self.beat()
            lease.check()
        return check

    def stop(self) -> None:
        """SIGTERM (see child.on_stop): mid-request, the job goes back at once."""
        self.stopping.set()
        if self.interruptible:
            raise Stopping("SIGTERM")

    def run(self) -> None:
        while not self.stopping.is_set():
            self.beat()
            try:
                self.db.ensure_ready()
                if self.held_back():
                    continue
                self.state = "idle"
                job = self.queue.next_job(self.worker_id, timeout=1.0)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.wait_for_database(exc)
                continue
            self.outage.back()
            if job is not None:
                self.process(job)

    # -- the database away: wait for it, lose nothing --------------------------------------

    def wait_for_database(self, exc: BaseException) -> None:
        self.state = "waiting: database unreachable"
        self.outage.sleep(exc, self.stopping, self.beat)

    def through_outage(self, write: Callable[[], object]) -> None:
        """A write the job's outcome hangs on (its result, its hand-back): while the
        database is away, wait for it rather than lose the work; a stop gives up (the
        job's lease then returns it)."""
        while True:
            try:
                write()
                self.outage.back()
                return
            except Exception as exc:
                if not is_outage(exc) or self.stopping.is_set():
                    raise
                self.wait_for_database(exc)

    def database_lost(self, job: Job, exc: BaseException) -> None:
        """The database went away mid-job: hand the job back, uncharged, once it returns."""
        log.warning("database unreachable mid-job: handing the job back when it returns",
                    error=first_line(exc))
        try:
            self.through_outage(lambda: self.queue.release(job))
        except LeaseLost:
            pass
        except Exception as again:
            if not is_outage(again):
                raise

    def client(self, name: str) -> VlmClient | None:
        client = self.makers[name]()
        settings = self.config.provider(name)
        if client is None and name not in self.warned_keys:
            log.warning("no API key for provider, not using it", provider=name,
                        looked_in=where_keys_come_from(settings))
            self.warned_keys.add(name)
        elif client is not None:
            self.warned_keys.discard(name)
        return client

    def blocked(self, name: str) -> tuple[str, float] | None:
        """Why this provider cannot take a request now, and how long to wait before
        looking again; None when it can. A due probe of a paused provider runs here."""
        settings = self.config.provider(name)
        client = self.client(name)
        prefix = f"{name}: " if len(self.config.providers) > 1 else ""
        if client is None:
            return (f"waiting: {prefix}no {registry.label(settings)} API key "
                    f"({where_keys_come_from(settings)})", NO_KEY_RECHECK_SECONDS)
        shared = self.pauses.provider_state(name)
        if shared is None:
            return None
        now = utcnow()
        if shared.paused:
            if self.pauses.take_probe(name, self.probe_interval(name)):
                self.probe(name, client, shared)
                shared = self.pauses.provider_state(name)
                if shared is None or not shared.paused:
                    return None
            return (f"paused: {prefix}{shared.reason}: {shared.detail} "
                    f"(next probe {shared.probe_at:%H:%M:%S} UTC)", PAUSE_RECHECK_SECONDS)
        if shared.not_before is not None and shared.not_before > now:
            return (f"waiting: {prefix}rate limited until {shared.not_before:%H:%M:%S} UTC",
                    min((shared.not_before - now).total_seconds(), PAUSE_RECHECK_SECONDS))
        return None

    def held_back(self) -> bool:
        """True while no provider can take a request (this call waited a little)."""
        reasons = []
        for settings in self.config.providers:
            why = self.blocked(settings.name)
            if why is None:
                return False
            reasons.append(why)
        self.state = "; ".join(r for r, _ in reasons)
        wait = min(w for _, w in reasons)
        if any(r.startswith("paused") for r, _ in reasons) and wait <= PAUSE_RECHECK_SECONDS:
            self.db.wait_for_commit(wait)
        else:
            self.stopping.wait(wait)
        return True

    def probe_interval(self, name: str) -> float:
        return self.config.provider(name).pause_probe_minutes * 60

    def probe(self, name: str, client: VlmClient, shared: Pause) -> None:
        self.interruptible = True  # a probe may wait on the provider as long as a job does
        try:
            client.probe()
        except Stopping:
            return
        except AccountProblem as exc:
            self.pauses.pause(name, exc.reason, str(exc), self.probe_interval(name))
            log.warning("probe: still paused", provider=name, reason=exc.reason, error=str(exc))
            return
        except (AnalysisError, RateLimited) as exc:
            log.warning("probe inconclusive, still paused", provider=name, error=str(exc))
            return
        finally:
            self.interruptible = False
        if self.pauses.resume(name):
            log.info("probe succeeded, analysis resumed", provider=name, was=shared.reason)

    def pause_provider(self, name: str, problem: AccountProblem) -> None:
        self.pauses.pause(name, problem.reason, str(problem), self.probe_interval(name))
        log.error("provider paused for every analyzer", provider=name, reason=problem.reason,
                  error=str(problem), probe_in_s=self.probe_interval(name))

    def put_back(self, job: Job, until=None) -> None:
        try:
            self.queue.defer(job, until)
        except LeaseLost:
            log.warning("lease lost, job not put back")
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("job not put back: the database is away (its lease returns it)")

    def process(self, job: Job) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job.id, camera_id=job.camera_id):
            self.state = f"job {job.id}"
            log.info("job claimed", video=job.video_path, attempt=job.retry_count + 1)
            lease = LeaseKeeper(self.queue, job, self.published.unexpected)
            work = Layout(self.config.data_dir).work()
            work.mkdir(parents=True, exist_ok=True)  # RAM: the copies never touch the disk
            workdir = Path(tempfile.mkdtemp(prefix=f"job{job.id}-", dir=work))
            try:
                with lease:
                    outcome = self.analyze(job, workdir, self.keep_alive(lease))
                self.through_outage(lambda: self.complete(job, outcome))
                log.info("job completed", safety_score=outcome.safety_score,
                         incidents=len(outcome.incidents), tokens=outcome.total_tokens,
                         provider=outcome.provider)
            except Stopping:
                self.hand_back(job)
            except NoProvider as exc:
                log.warning("no provider can take the job now, put back", why=str(exc))
                self.put_back(job, exc.until)
            except FootageAway as exc:
                log.warning("footage on another node out of reach now, job put back",
                            node=job.node, why=str(exc), retry_in_s=exc.retry_in)
                self.put_back(job, utcnow() + timedelta(seconds=exc.retry_in))
            except LeaseLost:
                log.warning("lease lost, job dropped without writing")
            except AnalysisError as exc:
                if self.stopping.is_set():
                    # On a stop every process of the unit is signalled at once, FFmpeg
                    # too: a failure now says nothing about the footage.
                    log.info("failed while stopping, handed back", error=str(exc))
                    self.hand_back(job)
                else:
                    self.record_failure(job, str(exc), permanent=not exc.retryable,
                                        retry_after=exc.retry_after)
            except Exception as exc:  # a bug must fail one job, not the worker
                if is_outage(exc):
                    self.database_lost(job, exc)
                else:
                    self.published.unexpected(log, "unexpected error")
                    self.record_failure(job, f"unexpected error: {type(exc).__name__}: {exc}")
            finally:
                self.interruptible = False
                shutil.rmtree(workdir, ignore_errors=True)
                self.state = "idle"

    def recorded_elsewhere(self, job: Job) -> bool:
        """The job's footage is on another box (jobs from before nodes count as local)."""
        return job.node is not None and job.node != self.config.node_name

    def footage(self, job: Job, workdir: Path, keep_alive: Callable[[], None]) -> Path:
        """The video the job covers: here, or fetched from the node that recorded it."""
        if not self.recorded_elsewhere(job):
            return job_video(Layout(self.config.data_dir), job, workdir)
        node = Nodes(self.db).get(job.node)
        began = time.monotonic()
        path, size = fetch_footage(node, job, self.config.server.token,
                                   workdir / "footage.mp4",
                                   self.config.storage.ram_max_mb * 2**20, keep_alive)
        log.info("footage fetched from its node", node=job.node, bytes=size,
                 seconds=round(time.monotonic() - began, 3))
        return path

    def camera_prompt(self, job: Job) -> str:
        """The camera's prompt from this config, or from the config of the box that
        records it (its nodes row) for another box's camera."""
        camera = self.config.camera(job.camera_id)
        if camera is not None or not self.recorded_elsewhere(job):
            return camera.prompt if camera else ""
        node = Nodes(self.db).get(job.node) or {}
        return node.get("prompts", {}).get(job.camera_id, "")

    def complete(self, job: Job, outcome: Outcome) -> None:
        """Store the outcome; the incidents' pictures are made by the box that has the
        footage (here, or the recording node's notifier and server, on demand)."""
        if self.recorded_elsewhere(job):
            self.queue.complete(job, outcome)
        else:
            complete_with_snapshots(self.queue, job, outcome, self.binary,
                                    Layout(self.config.data_dir))

    def analyze(self, job: Job, workdir: Path, keep_alive: Callable[[], None]) -> Outcome:
        order = self.config.provider_order(job.camera_id)
        source = self.footage(job, workdir, keep_alive)
        clip = prepare_clip(self.binary, self.config.analysis, source, workdir,
                            frames=self.gating or any(registry.wants_frames(p) for p in order))
        keep_alive()
        if self.skip_static(job, clip):
            log.info("static clip, no request", frames=len(clip.frames))
            return no_activity()
        if self.gating and len(clip.frames) == 1:
            clip = still_clip(self.binary, clip, workdir)  # the periodic look: one picture
        window = None if job.kind == "archive" else (job.first_frame_at, job.duration_seconds)
        prompt = build_prompt(self.camera_prompt(job), clip, window)
        failures: list[tuple[str, AnalysisError]] = []
        skipped: list[tuple[str, object]] = []
        for settings in order:
            if self.stopping.is_set():
                raise Stopping("stopping between providers")
            name = settings.name
            why = self.blocked(name)
            if why is not None:
                skipped.append((why[0], self.pauses.provider_state(name)))
                continue
            try:
                outcome = self.ask(settings, self.client(name), job, clip, prompt, keep_alive)
            except AccountProblem as exc:
                self.pause_provider(name, exc)
                skipped.append((str(exc), None))
            except RateLimited as exc:
                wait = min(exc.retry_after, settings.max_retry_wait_seconds)
                self.pauses.hold_off(name, wait)
                log.warning("rate limited, every analyzer waits", provider=name,
                            seconds=wait, error=str(exc))
                skipped.append((str(exc), self.pauses.provider_state(name)))
            except AnalysisError as exc:
                self.provider_failed(name, job, exc)
                failures.append((name, exc))
            except LeaseLost:
                raise
            except Exception as exc:  # an answer the provider code did not expect
                self.published.unexpected(
                    log, "provider answered something unexpected, trying the next",
                    provider=name)
                error = AnalysisError(f"unexpected answer: {type(exc).__name__}: {exc}",
                                      retryable=True)
                self.provider_failed(name, job, error)
                failures.append((name, error))
            else:
                self.rejections.pop(name, None)
                self.answered_at = time.monotonic()
                return outcome
            keep_alive()
        if failures:
            if all(exc.bad_request for _, exc in failures) and self.first_refusal(job):
                raise NoProvider("every provider refused the request: " + "; ".join(
                    f"{name}: {exc}" for name, exc in failures), until=utcnow() + timedelta(
                        seconds=self.config.analysis.retry_backoff_seconds))
            raise combined(failures)
        raise NoProvider("; ".join(str(why) for why, _ in skipped),
                         until=earliest_retry(skipped))

    def provider_failed(self, name: str, job: Job, exc: AnalysisError) -> None:
        self.pauses.note_failure(name, str(exc))
        log.warning("provider failed, trying the next", provider=name, error=str(exc))
        if exc.bad_request:
            self.count_rejection(name, job, exc)

    def count_rejection(self, name: str, job: Job, exc: AnalysisError) -> None:
        """The same 400 on MISCONFIGURED_AFTER windows in a row puts the provider aside
        with the server's own message, probed again like a paused provider."""
        key = rejection_key(str(exc))
        run = self.rejections.get(name)
        if run is None or run.key != key:
            run = self.rejections[name] = Rejections(key)
        run.jobs.add(job.id)
        if len(run.jobs) < MISCONFIGURED_AFTER:
            return
        del self.rejections[name]
        detail = f"{exc} (the same on {MISCONFIGURED_AFTER} windows in a row)"
        self.pauses.pause(name, MISCONFIGURED, detail, self.probe_interval(name))
        log.error("provider put aside as misconfigured", provider=name, error=str(exc),
                  windows=MISCONFIGURED_AFTER, probe_in_s=self.probe_interval(name))

    def first_refusal(self, job: Job) -> bool:
        """Whether a job every provider refused (400) goes back uncharged: yes, unless it
        was refused before and a provider has answered other windows since, which makes
        the refusal this clip's (a file no provider takes) and the job pays a retry."""
        now = time.monotonic()
        seen = self.rejected_jobs.get(job.id)
        if seen is not None and self.answered_at > seen:
            return False
        if len(self.rejected_jobs) >= REMEMBERED_REJECTIONS:
            self.rejected_jobs.clear()
        self.rejected_jobs.setdefault(job.id, now)
        return True

    def ask(self, settings, client: VlmClient, job: Job, clip: Clip, prompt: str,
            keep_alive: Callable[[], None]) -> Outcome:
        self.interruptible = True
        try:
            answer = client.analyze(clip, prompt, keep_alive)
        finally:
            self.interruptible = False
            self.note_adaptations(settings.name, client)
        finding = check_answer(answer.data, clip_duration(job, clip), clip.frame_interval_s,
                               log=log.warning)
        base = job.first_frame_at
        incidents = [IncidentRecord(
            start_at=base + timedelta(seconds=i["start_offset_s"]),
            end_at=base + timedelta(seconds=i["end_offset_s"]),
            category=i["category"], severity=i["severity"], description=i["description"],
            confidence=i["confidence"]) for i in finding.incidents]
        result = {"safety_score": finding.safety_score, "summary": finding.summary,
                  "incidents": list(finding.incidents)}
        if answer.request or answer.cached_tokens is not None:
            result["request"] = dict(answer.request, cached_tokens=answer.cached_tokens)
        return Outcome(result=result, safety_score=finding.safety_score, incidents=incidents,
                       **token_fields(answer), model_version=answer.model_version,
                       provider=settings.name,
                       model=settings.model,
                       merge_within_s=(None if job.kind == "archive"
                                       else MERGE_FRAME_INTERVALS * clip.frame_interval_s))

    def note_adaptations(self, name: str, client: VlmClient) -> None:
        """What the provider's client changed to suit its server: logged once, kept in
        this analyzer's state file for status."""
        found = client.adaptations()
        known = self.adapted.get(name, {})
        if found == known:
            return
        for key, text in found.items():
            if known.get(key) != text:
                log.warning("provider adapted to its server", provider=name, what=key,
                            detail=text)
        self.adapted[name] = found
        self.write_state()

    @property
    def gating(self) -> bool:
        return self.config.analysis.static_check_minutes > 0

    def skip_static(self, job: Job, clip: Clip) -> bool:
        """A clip in which nothing changed is not sent, unless the camera has had no clip
        sent for static_check_minutes (a covered or frozen camera must still be seen)."""
        if not self.gating or len(clip.frames) != 1:
            return False
        last = self.queue.last_model_request(job.camera_id)
        if last is None:
            return False
        due = last + timedelta(minutes=self.config.analysis.static_check_minutes)
        return job.segment_start < due

    def hand_back(self, job: Job) -> None:
        try:
            self.queue.release(job)
            log.info("job handed back on stop")
        except LeaseLost:
            pass
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("job not handed back: the database is away (its lease returns it)")

    def record_failure(self, job: Job, error: str, *, permanent: bool = False,
                       retry_after: float | None = None) -> None:
        try:
            status = self.queue.fail(job, error, permanent=permanent, retry_after=retry_after)
        except LeaseLost:
            log.warning("lease lost, failure not recorded", error=error)
            return
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("failure not recorded: the database is away (the job's lease returns "
                        "it)", error=error)
            return
        log.warning("job failed", error=error, status=status, permanent=permanent)


def no_activity() -> Outcome:
    """The stored result of a static clip: no request, no incident, no token."""
    return Outcome(result={"safety_score": 100, "summary": NO_ACTIVITY, "incidents": []},
                   safety_score=100, **dict.fromkeys(TOKEN_FIELDS, 0))


def combined(failures: list[tuple[str, AnalysisError]]) -> AnalysisError:
    """One error for a job every provider failed: the job's backoff retries it, unless
    every provider failed it for good (a refusal, a clip that cannot be sent)."""
    if len(failures) == 1:
        return failures[0][1]
    hints = [exc.retry_after for _, exc in failures if exc.retry_after]
    return AnalysisError("; ".join(f"{name}: {exc}" for name, exc in failures),
                         retryable=any(exc.retryable for _, exc in failures),
                         retry_after=min(hints) if hints else None)


def earliest_retry(skipped: list[tuple[str, object]]):
    """When to look at the job again: the soonest rate-limit end if every provider is only
    rate-limited, else a few seconds (a paused provider resumes at its probe)."""
    ends = [state.not_before for _, state in skipped
            if isinstance(state, Pause) and not state.paused and state.not_before]
    if ends and len(ends) == len(skipped):
        return min(ends)
    return utcnow() + timedelta(seconds=PAUSED_DEFER_SECONDS)








def prepare_clip(binary: str, analysis: AnalysisConfig, source: Path, workdir: Path, *,
                 frames: bool = False) -> Clip:
    """What the model will see: the reduced copy or the archive itself, and (frames) the
    distinct keyframes of the reduced copy."""
    clip = prepare_video(binary, analysis, source, workdir)
    if not frames:
        return clip
    copy = clip.path
    if analysis.mode == "original":
        copy = prepare_video(binary, replace(analysis, mode="reduced"), source, workdir).path
    return replace(clip, frames=distinct_frames(binary, copy, workdir / "frames",
                                                analysis.change_threshold))


def still_clip(binary: str, clip: Clip, workdir: Path) -> Clip:
    """A clip in which nothing changed, as its one picture (a one-frame video for the
    providers that take video): the static check asks whether the camera still sees."""
    target = workdir / "still.mp4"
    proc = subprocess.run(still_video_command(binary, clip.frames[0].path, target),
                          capture_output=True, text=True, timeout=120, env=child_env())
    if proc.returncode != 0 or not target.exists():
        return clip  # the full clip answers the same question, at a higher price
    return replace(clip, path=target, fps=1.0, mime_type="video/mp4", still=True)


def distinct_frames(binary: str, copy: Path, directory: Path,
                    threshold: int) -> tuple[Frame, ...]:
    """The copy's keyframes with near-duplicates dropped (FFmpeg's mpdecimate): one frame
    left means nothing changed in the whole clip."""
    directory.mkdir()
    proc = subprocess.run(distinct_frames_command(binary, copy, directory / "frame_%04d.jpg",
                                                  threshold),
                          capture_output=True, text=True, timeout=600, env=child_env())
    paths = sorted(directory.glob("frame_*.jpg"))
    offsets = frame_offsets(proc.stderr)
    if proc.returncode != 0 or not paths or len(offsets) != len(paths):
        reason = last_line(proc.stderr)
        raise AnalysisError(f"keyframes could not be extracted: {reason}", retryable=False)
    return tuple(Frame(path, max(offset, 0.0)) for path, offset in zip(paths, offsets))


def prepare_video(binary: str, analysis: AnalysisConfig, source: Path, workdir: Path) -> Clip:
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
        if source.suffix != ".mp4":
            source = mp4_copy(binary, source, workdir / "original.mp4")
        return Clip(source, duration, analysis.fps, "video/mp4")
    target = workdir / "analysis.mp4"
    if target.exists():
        return Clip(target, duration, copy_fps(binary, target, duration, analysis.fps))
    proc = subprocess.run(analysis_copy_command(binary, source, target, analysis.fps,
                                                analysis.height),
                          capture_output=True, text=True, timeout=1800, env=child_env())
    if proc.returncode != 0 or not target.exists():
        reason = last_line(proc.stderr)
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
    """One file, analysed now and nothing stored: for tuning prompts (`vlmguard analyze`).
    The camera's first provider that has a key answers; no fallback, no gating."""
    camera = config.camera(camera_id) if camera_id else None
    if camera_id and camera is None:
        raise VlmguardError(f"no camera {camera_id!r} in {config.source}")
    order = config.provider_order(camera_id)
    makers = client_makers(config)
    chosen = next(((p, makers[p.name]()) for p in order if makers[p.name]() is not None), None)
    if chosen is None:
        first = order[0]
        raise VlmguardError(f"no {registry.label(first)} API key: set "
                            f"{where_keys_come_from(first)}")
    settings, client = chosen
    workdir = Path(tempfile.mkdtemp(prefix="vlmguard-analyze-"))
    try:
        clip = prepare_clip(ffmpeg_binary(), config.analysis, source, workdir,
                            frames=registry.wants_frames(settings))
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

    def __init__(self, queue: JobQueue, job: Job, unexpected=None):
        self.queue = queue
        self.job = job
        self.unexpected = unexpected or ChildState().unexpected
        self.interval = max(queue.lease_seconds / 3, 0.2)
        self.done = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True, name=f"lease-{job.id}")

    def beat(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.queue.heartbeat(self.job)
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:
                if is_outage(exc):  # the database is briefly away: keep trying
                    log.warning("heartbeat failed", error=str(exc))
                else:  # a bug: the lease may lapse and the job be done again; say so
                    self.unexpected(log, "heartbeat failed unexpectedly: the job may be "
                                    "done again", job_id=self.job.id)

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
