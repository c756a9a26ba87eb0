"""`vlmguard run`: start every process, keep each alive, stop them in order.

The loop follows gunicorn's arbiter: signal handlers only queue the signal; the loop
waits on the children's sentinels and the signal pipe, then reaps the dead, kills the
hung, restarts what is due and tells systemd how things stand.

Start method: fork, from a supervisor that has imported everything the children run and
then frozen those objects for the garbage collector, so every child shares those pages
instead of holding its own copy (the whole daemon's memory is most of what this buys).
Fork is safe here because of what the supervisor never holds when it forks: a thread,
an event loop or a database connection (the status line's store is closed before each
fork). What it does hold (the data-dir lock, the signal pipe, the systemd socket) each
child closes right after the fork, and each child resets its signal handlers and opens
its own logging and database engine.

Roles fail alone. A child that keeps exiting (more than daemon.max_restarts times in
restart_window_seconds) is a crash loop. The streamer's stops the daemon with exit 1, for
systemd to restart: without it there is no video, and a fresh start is all that is left
to try. Any other role's is backed off: retried with a wait doubling up to
daemon.max_backoff_seconds, reported in the state file (so in `vlmguard status`,
/api/health, /metrics and the systemd STATUS line) and, through the notifier, to the
operators' alert destinations, while the streamer and its FFmpegs run on. It counts as
recovered once it stays up a minute.

The database is not needed to start: one that cannot be reached now (a PostgreSQL server
down, a SQLite file held locked) only means the children that use it wait for it; one
that is wrong (another program's file, a newer schema, a refused login) is refused here.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vlmguard import analyzer, archiver, notifier, streamer
from vlmguard.config import Config, check_server_settings, load_config, port_problem
from vlmguard.errors import (ConfigError, DatabaseError, DatabaseUnreachable, StartupError,
                             VlmguardError)
from vlmguard.ffmpeg import ffmpeg_binary
from vlmguard.child import STACK_SIGNAL, ChildState, bootstrap, stack_file
from vlmguard.health import Beat, clear_stacks, clear_states, read_states
from vlmguard.logs import get_logger
from vlmguard.store.database import Database
from vlmguard.store.engines import is_outage
from vlmguard.store.nodes import NodeInfo, Nodes, NodeTaken, box_id
from vlmguard.store.pauses import Pauses
from vlmguard.store.reports import Reports
from vlmguard.vlm import registry

log = get_logger("vlmguard.supervisor")

START_METHOD = "fork"
# Imported by the supervisor before the first fork so that the children share their pages
# (the children's own modules are imported above, for the role table); google.genai is the
# analyzers' alone, but sharing it costs the others nothing.
CHILD_MODULES = ("google.genai", "google.genai.types")
# glibc malloc settings, as (mallopt parameter number, environment variable, value).
MALLOC_SETTINGS = (
    # Two arenas per process rather than one per thread.
    (-8, "MALLOC_ARENA_MAX", 2),
    # Big buffers (>= 128 KiB: packets, upload chunks) are mmapped and handed back when
    # freed, rather than the threshold creeping up until they stay in the heap for good.
    (-3, "MALLOC_MMAP_THRESHOLD_", 128 * 1024),
)
FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 60.0, 60.0
STATUS_EVERY = 5.0
# The status line's database figures: after a failed look, the next waits this long,
# doubling, so an unreachable database never holds the supervisor's loop for long.
STATUS_DB_RETRY, STATUS_DB_RETRY_MAX = 5.0, 120.0
# How long a hung child has to write its stack (faulthandler, in a signal handler: it
# takes milliseconds; a stopped child never does) before it is killed all the same.
STACK_WAIT_SECONDS = 2.0
STACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Role:
    """One kind of child: how many the config wants, how to start one, how long it may be
    silent before it counts as hung, and when it stops (lower stop_order stops first;
    roles start in the reverse order)."""

    name: str
    entry: Callable[..., None]
    count: Callable[[Config], int]
    args: Callable[[Config, int], tuple]
    hang_seconds: Callable[[Config], float]
    stop_order: int
    pool: bool = False  # several at once: children are numbered (analyzer-0, analyzer-1 ...)
    # The daemon lives and dies with it: its crash loop stops vlmguard (exit 1); any other
    # role's crash loop backs that role off alone.
    essential: bool = False

    def child_name(self, config: Config, index: int) -> str:
        return f"{self.name}-{index}" if self.pool else self.name


def one(_config: Config) -> int:
    return 1


def config_only(config: Config, _index: int) -> tuple:
    return (config,)


def config_and_index(config: Config, index: int) -> tuple:
    return (config, index)


def daemon_hang(config: Config) -> float:
    return config.daemon.hang_seconds


def analyzer_hang(config: Config) -> float:
    """An analyzer's main thread may sit in one API call for up to the request timeout,
    once per provider when each fails in turn."""
    return config.daemon.hang_seconds + sum(registry.longest_wait_seconds(p)
                                            for p in config.providers)


def analyzer_count(config: Config) -> int:
    return config.analysis.workers


def notifier_count(config: Config) -> int:
    """The notifier runs when there is somewhere to send alerts."""
    return int(config.mqtt.enabled or config.alerts.enabled)


# The role table the supervisor reads: start in ascending stop_order reversed (archiver
# first, so every closed archive is registered), stop analyzers first (they make the
# incidents), then the notifier (which sends what they made), then the streamer (which
# closes the open archive), then the archiver (which registers it on the way out).
ROLES = (
    Role("analyzer", analyzer.main, analyzer_count, config_and_index, analyzer_hang, 0,
         pool=True),
    Role("notifier", notifier.main, notifier_count, config_only, daemon_hang, 1),
    Role("streamer", streamer.main, one, config_only, daemon_hang, 2, essential=True),
    Role("archiver", archiver.main, one, config_only, daemon_hang, 3),
)


@dataclass
class Child:
    """One supervised slot: its role, how to start it, and its restart history."""

    name: str
    role: Role
    args: tuple
    hang_seconds: float
    process: Any = None
    beat: Beat = field(default_factory=Beat)
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    restarts: list[float] = field(default_factory=list)
    restart_count: int = 0
    backed_off_since: float | None = None  # wall clock: when its crash loop was seen
    last_exit: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


def plan_children(config: Config) -> list[Child]:
    """The children the role table asks for, in start order (the reverse of stopping)."""
    return [Child(role.child_name(config, i), role, role.args(config, i),
                  role.hang_seconds(config))
            for role in sorted(ROLES, key=lambda r: -r.stop_order)
            for i in range(role.count(config))]


class Notifier:
    """sd_notify over the datagram socket systemd names in $NOTIFY_SOCKET (if any)."""

    def __init__(self, address: str | None):
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        if self.socket is not None:
            # Never block the supervisor on a full socket queue (systemd's sd_notify doesn't).
            self.socket.setblocking(False)

    def send(self, message: str) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify failed", message=message.split("=")[0], error=str(exc))


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.stopping = False
        self.context = multiprocessing.get_context(START_METHOD)
        tune_malloc()
        # Only the supervisor may talk to systemd (NotifyAccess=main); children never see it.
        self.notifier = Notifier(os.environ.pop("NOTIFY_SOCKET", None))
        watchdog_usec = int(os.environ.pop("WATCHDOG_USEC", "0") or 0)
        os.environ.pop("WATCHDOG_PID", None)
        self.watchdog_every = watchdog_usec / 2e6 if watchdog_usec else None
        self.children = self.plan(config)
        self.signals: list[int] = []
        self.lock_file = None
        self.signal_pipe: tuple[int, int] | None = None
        # Children watch the read end; only the supervisor keeps the write end (each child
        # closes its inherited copy right after the fork), so the supervisor's death, even
        # by SIGKILL, is end-of-file in every child. multiprocessing's own parent pipes do
        # not do this: a forked sibling inherits the supervisor's end of each earlier
        # child's pipe, and a stopped sibling then holds it open for good.
        self.lifeline: tuple[int, int] | None = None
        self.reports: Reports | None = None  # for the status line; never open across a fork
        self.status_db_retry_at = 0.0
        self.status_db_wait = STATUS_DB_RETRY
        self.started_at = time.time()
        self.state = ChildState(config.data_dir, "supervisor")
        # This start's row among the boxes sharing the database (a fresh instance id).
        self.node = NodeInfo.of(config)
        self.node_taken = False
        os.register_at_fork(after_in_child=self.close_in_child)

    def plan(self, config: Config) -> list[Child]:
        return plan_children(config)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.lock_data_dir()
        self.check_dependencies()
        self.join_site()
        share_with_children(self.config)
        read_fd, write_fd = self.signal_pipe = os.pipe()
        self.lifeline = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.queue_signal)
        clear_states(self.config.data_dir)
        clear_stacks(self.config.data_dir)
        self.started_at = time.time()
        for child in self.children:
            self.spawn(child)
        self.publish()
        self.notifier.send("READY=1")
        log.info("vlmguard running", children=len(self.children), start_method=START_METHOD,
                 cameras=len(self.config.cameras), data_dir=str(self.config.data_dir))
        code = self.manage(read_fd)
        self.stop()
        return code

    def manage(self, read_fd: int) -> int:
        last_ping = last_status = 0.0
        while True:
            sentinels = [c.process.sentinel for c in self.children if c.alive]
            multiprocessing.connection.wait(sentinels + [read_fd], timeout=self.tick())
            drain(read_fd)
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    self.stopping = True
                    return 0
            self.reap()
            self.murder_hung()
            failed = self.crash_looping()
            if failed is not None:
                self.stopping = True
                log.error("crash loop: stopping vlmguard so systemd can restart it",
                          child=failed.name, restarts=len(failed.restarts),
                          window_s=self.config.daemon.restart_window_seconds,
                          **describe_exit(failed.process.exitcode))
                return 1
            self.note_recovered()
            self.spawn_due()
            now = time.monotonic()
            if self.watchdog_every and now - last_ping >= self.watchdog_every and self.healthy():
                self.notifier.send("WATCHDOG=1")
                last_ping = now
            if now - last_status >= STATUS_EVERY:
                self.notifier.send(f"STATUS={self.status_line()}")
                self.publish()
                last_status = now

    def tick(self) -> float:
        due = [c.restart_at - time.monotonic() for c in self.children if c.restart_at]
        return max(0.05, min([1.0, *due] + ([self.watchdog_every] if self.watchdog_every else [])))

    def queue_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT and (self.stopping or signal.SIGINT in self.signals):
            log.warning("second SIGINT: stopping at once")
            self.kill_all()
            os._exit(1)
        self.signals.append(signum)

    # -- the verbs ---------------------------------------------------------------------------

    def spawn(self, child: Child) -> None:
        child.beat = Beat(self.context.Value("d", time.monotonic(), lock=False))
        stack = stack_file(self.config.data_dir, child.name)
        child.process = self.context.Process(target=bootstrap, name=child.name,
                                             args=(child.role.entry, *child.args, child.beat),
                                             kwargs={"lifeline": self.lifeline[0],
                                                     "stack_path": str(stack)})
        self.close_store()
        settle_memory()
        child.process.start()
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("child started", child=child.name, child_pid=child.process.pid)

    def reap(self) -> None:
        for child in self.children:
            if child.process is None or child.alive or child.restart_at is not None:
                continue
            now = time.monotonic()
            if now - child.started_at > STABLE_AFTER:
                child.backoff = FIRST_BACKOFF
            window = self.config.daemon.restart_window_seconds
            child.restarts = [t for t in child.restarts if now - t < window] + [now]
            child.restart_count += 1
            child.last_exit = describe_exit(child.process.exitcode)
            self.log_death_stack(child)
            if self.loops(child) and not child.role.essential and child.backed_off_since is None:
                self.back_off(child)
            child.restart_at = now + child.backoff
            log.warning("child exited", child=child.name, child_pid=child.process.pid,
                        **child.last_exit, restart_in_s=round(child.backoff, 1))
            most = (self.config.daemon.max_backoff_seconds if child.backed_off_since
                    else MAX_BACKOFF)
            child.backoff = min(child.backoff * 2, most)

    def loops(self, child: Child) -> bool:
        return len(child.restarts) > self.config.daemon.max_restarts

    def back_off(self, child: Child) -> None:
        """A role other than the streamer crash-loops: it alone waits longer and longer
        between tries; the video runs on."""
        child.backed_off_since = time.time()
        log.error("crash loop: role backed off, retried with a growing wait; live video and "
                  "recording go on", child=child.name, restarts=len(child.restarts),
                  window_s=self.config.daemon.restart_window_seconds,
                  most_wait_s=self.config.daemon.max_backoff_seconds, **child.last_exit)
        self.publish()

    def note_recovered(self) -> None:
        """A backed-off role that has stayed up a minute is well again."""
        now = time.monotonic()
        for child in self.children:
            if child.backed_off_since is not None and child.alive \
                    and now - child.started_at > STABLE_AFTER:
                log.info("role recovered from its crash loop", child=child.name,
                         backed_off_s=round(time.time() - child.backed_off_since))
                child.backed_off_since = None
                child.restarts = []
                child.backoff = FIRST_BACKOFF
                self.publish()

    def murder_hung(self) -> None:
        for child in self.children:
            if child.alive and child.beat.age() > child.hang_seconds:
                silent = round(child.beat.age(), 1)
                stack = self.ask_for_stack(child)
                if stack:
                    log.error("stack of a hung child", child=child.name,
                              child_pid=child.process.pid, stack=stack)
                log.error("child hung: no heartbeat, killing it", child=child.name,
                          child_pid=child.process.pid, silent_s=silent,
                          stack_logged=bool(stack))
                child.process.kill()
                child.process.join(5)

    def ask_for_stack(self, child: Child) -> str:
        """The hung child's Python stack, every thread (faulthandler, see child.py); empty
        when it gives none in time: stopped (SIGSTOP, a debugger), or stuck in the kernel."""
        path = stack_file(self.config.data_dir, child.name)
        before = file_size(path)
        try:
            os.kill(child.process.pid, STACK_SIGNAL)
        except OSError:
            return ""
        deadline = time.monotonic() + STACK_WAIT_SECONDS
        size = before
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = file_size(path)
            if now > before and now == size:  # written, and no longer growing
                break
            size = now
        return read_tail(path, before)

    def log_death_stack(self, child: Child) -> None:
        """A child killed by a fatal signal (SIGSEGV in a C extension, SIGABRT) left
        the stack it died in: into the log with the exit."""
        if child.process.exitcode in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS,
                                      -signal.SIGFPE, -signal.SIGILL):
            stack = read_tail(stack_file(self.config.data_dir, child.name), 0)
            if stack:
                log.error("stack of a crashed child", child=child.name,
                          child_pid=child.process.pid, stack=stack)

    def crash_looping(self) -> Child | None:
        """The essential child (the streamer) in a crash loop: the daemon must go."""
        return next((c for c in self.children if c.role.essential and self.loops(c)), None)

    def spawn_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None and child.restart_at <= now:
                log.info("child restarting", child=child.name)
                self.spawn(child)
                self.publish()

    def stop(self) -> None:
        """Reverse start order, each with a bounded wait, then whatever is left is killed."""
        self.notifier.send("STOPPING=1")
        self.stop_children(self.children)
        clear_states(self.config.data_dir)
        self.leave_site()
        self.close_store()
        log.info("vlmguard stopped")

    def stop_children(self, children: list[Child]) -> None:
        """Role by role in the table's stop order; each group gets the stop timeout, then
        whatever is left of it is killed."""
        timeout = self.config.daemon.stop_timeout_seconds
        for role in sorted(ROLES, key=lambda r: r.stop_order):
            group = [c for c in children if c.role.name == role.name]
            for child in group:
                if child.alive:
                    child.process.terminate()
            deadline = time.monotonic() + timeout
            for child in group:
                if child.process is not None:
                    child.process.join(max(0.0, deadline - time.monotonic()))
                    if child.alive:
                        log.error("child did not stop in time, killing it", child=child.name)
                        child.process.kill()
                        child.process.join(5)

    def kill_all(self) -> None:
        for child in self.children:
            if child.alive:
                child.process.kill()

    def reload(self) -> None:
        """SIGHUP: read the config again; if it is valid and can start, restart every child
        with it. A config that would only fail in a child (a taken port, an unusable
        database) is refused here: the running one keeps recording instead of crash-looping."""
        try:
            config = load_config(self.config.source)
            check_startable(config, running=self.config)
        except VlmguardError as exc:
            log.error("reload refused, keeping the running config", error=str(exc))
            return
        log.info("reloading", cameras=len(config.cameras), workers=config.analysis.workers)
        self.probe_paused(config)
        self.stop_children(self.children)
        self.config = config
        self.node = NodeInfo.of(config, self.node.instance, self.node.box)
        self.children = self.plan(config)
        for child in self.children:
            self.spawn(child)
        self.publish()

    def probe_paused(self, config: Config) -> None:
        """SIGHUP also says "fixed it": a paused analysis probes at once, not in 10 minutes."""
        try:
            with Database.from_config(config, create=False) as db:
                if Pauses(db).probe_now():
                    log.info("analysis paused: probing at once")
        except DatabaseError as exc:
            log.warning("cannot ask the analyzers to probe", error=str(exc))
        except Exception as exc:  # a reload must not fail on this, nor on a bug
            if is_outage(exc):
                log.warning("cannot ask the analyzers to probe", error=str(exc))
            else:
                self.state.unexpected(log, "probing paused analysis failed unexpectedly")

    def named(self, prefix: str, children: list[Child] | None = None) -> list[Child]:
        return [c for c in (self.children if children is None else children)
                if c.name.startswith(prefix)]

    # -- what systemd and `vlmguard status` hear --------------------------------------------

    def publish(self) -> None:
        self.state.publish({
            "started_at": self.started_at,
            # check-config accepts a port that this data dir's own daemon holds.
            "listen": {"host": self.config.server.host, "port": self.config.server.port},
            "children": {c.name: self.child_report(c) for c in self.children}})

    def child_report(self, child: Child) -> dict[str, Any]:
        """What `vlmguard status`, /api/health and /metrics say of one child."""
        if child.backed_off_since is not None:
            state = "backed off"
        else:
            state = "running" if child.alive else "restarting"
        due = (round(max(child.restart_at - time.monotonic(), 0.0), 1)
               if child.restart_at is not None else None)
        return {"pid": child.process.pid if child.process else None, "alive": child.alive,
                "restarts": child.restart_count, "state": state,
                "backed_off_since": child.backed_off_since, "next_try_in_s": due,
                "last_exit": child.last_exit or None}

    def healthy(self) -> bool:
        """What the watchdog ping vouches for: the supervisor's loop turns and no child it
        runs is hung (a hung one is killed anyway). A role backed off or waiting to be
        restarted is the supervisor doing its job, not a reason for systemd to kill
        the video with it."""
        return all(c.beat.age() < c.hang_seconds for c in self.children if c.alive)

    def status_line(self) -> str:
        states = read_states(self.config.data_dir)
        cameras = states.get("streamer", {}).get("cameras", {})
        live = sum(1 for c in cameras.values() if c.get("online"))
        busy = sum(1 for name, s in states.items()
                   if name.startswith("analyzer-") and str(s.get("state", "")).startswith("job"))
        pending, alerts = self.queue_figures()
        backed_off = [c.name for c in self.children if c.backed_off_since is not None]
        return (f"cameras live {live}/{len(self.config.cameras)}, jobs pending {pending}, "
                f"analyzers busy {busy}/{self.config.analysis.workers}"
                + (f", alerts pending {alerts}" if notifier_count(self.config) else "")
                + (f", backed off (crash loop): {' '.join(backed_off)}" if backed_off else ""))

    def queue_figures(self) -> tuple[Any, Any]:
        """Jobs and alerts pending, or "?" while the database cannot be read (looked at
        again after a growing wait: the supervisor's loop must never wait on it)."""
        if time.monotonic() < self.status_db_retry_at:
            return "?", "?"
        try:
            if self.reports is None:
                self.reports = Reports(Database.from_config(self.config, create=False))
            self.beat_node(self.reports.db)
            pending = sum(s["pending"] for s in self.reports.counts().values())
            alerts = (sum(d["pending"] for d in self.reports.delivery_counts().values())
                      if notifier_count(self.config) else None)
        except Exception as exc:  # the status line must not take the supervisor down
            if not isinstance(exc, DatabaseError) and not is_outage(exc):
                self.state.unexpected(log, "status line's database figures failed unexpectedly")
            self.close_store()
            self.status_db_retry_at = time.monotonic() + self.status_db_wait
            self.status_db_wait = min(self.status_db_wait * 2, STATUS_DB_RETRY_MAX)
            return "?", "?"
        self.status_db_wait = STATUS_DB_RETRY
        return pending, alerts

    # -- this box among the boxes sharing the database ---------------------------------------

    def join_site(self) -> None:
        """Take this box's node name, refused when another live vlmguard holds it. A
        database away now is no reason not to record: the heartbeat joins later."""
        try:
            self.node = NodeInfo.of(self.config, box=box_id(self.config.data_dir))
        except OSError as exc:
            raise StartupError(f"cannot use data directory {self.config.data_dir}: "
                               f"{exc.strerror or exc}") from None
        try:
            with Database.from_config(self.config, create=False) as db:
                Nodes(db).join(self.node)
        except NodeTaken:
            raise
        except Exception as exc:
            if not (isinstance(exc, DatabaseUnreachable) or is_outage(exc)):
                raise
            log.warning("node not registered yet: the database is unreachable",
                        node=self.node.name, error=str(exc).splitlines()[0][:300])
            return
        log.info("node joined", node=self.node.name, role=self.node.role,
                 public_url=self.node.public_url)

    def beat_node(self, db: Database) -> None:
        taken = not Nodes(db).heartbeat(self.node)
        if taken and not self.node_taken:
            log.error("another running vlmguard took this node name while this one could "
                      "not reach the database; set daemon.node to a name of its own",
                      node=self.node.name)
        self.node_taken = taken

    def leave_site(self) -> None:
        try:
            if self.reports is None:
                self.reports = Reports(Database.from_config(self.config, create=False))
            Nodes(self.reports.db).leave(self.node)
        except Exception as exc:  # a stop must not fail on this: the heartbeat goes stale
            log.warning("node not marked stopped", error=str(exc).splitlines()[0][:300])

    def close_store(self) -> None:
        if self.reports is not None:
            self.reports.db.close()
            self.reports = None

    def close_in_child(self) -> None:
        """Runs in each child right after the fork: drop what only the supervisor may use.

        The lock must end with the supervisor, systemd must hear from the supervisor alone
        (NotifyAccess=main), and a child's signals must not wake the supervisor's loop.
        """
        if self.signal_pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self.signal_pipe:
                os.close(fd)
        if self.lock_file is not None:
            self.lock_file.close()
        if self.notifier.socket is not None:
            self.notifier.socket.close()
        if self.lifeline is not None:
            os.close(self.lifeline[1])
        # Nothing left to close should this child ever fork in turn.
        self.signal_pipe = self.lock_file = self.notifier.socket = self.lifeline = None

    # -- before anything starts ----------------------------------------------------------------

    def lock_data_dir(self) -> None:
        data_dir = self.config.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.lock_file = open(data_dir / "vlmguard.pid", "a+")
        except OSError as exc:
            raise StartupError(f"cannot use data directory {data_dir}: "
                               f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.seek(0)
            other = self.lock_file.read().strip() or "?"
            raise StartupError(
                f"another vlmguard (pid {other}) is already running on {data_dir}") from None
        self.lock_file.truncate(0)
        self.lock_file.write(f"{os.getpid()}\n")
        self.lock_file.flush()

    def check_dependencies(self) -> None:
        """Fail with one line now rather than crash-loop a child later."""
        check_startable(self.config)


def check_startable(config: Config, running: Config | None = None) -> None:
    """Everything a child would otherwise find out by crashing: the server rules, FFmpeg,
    the database (created or upgraded here, once) and the port. On reload (running set),
    the port the running streamer holds is its own, and the data dir, whose lock the
    supervisor holds, cannot move."""
    check_server_settings(config)
    if running is not None and config.data_dir != running.data_dir:
        raise ConfigError(f"{config.source}: storage.data_dir: cannot change on reload "
                          f"(this vlmguard holds {running.data_dir}); restart vlmguard")
    ffmpeg_binary()
    check_secret_files(config)
    check_database(config)
    address = (config.server.host, config.server.port)
    if running is None or address[1] != running.server.port:
        problem = port_problem(*address)
        if problem:
            raise StartupError(problem)


def check_database(config: Config) -> None:
    """Create or upgrade the schema now, once; refuse a database that is wrong. One that
    cannot be reached now is not wrong: recording starts, its users wait for it."""
    try:
        Database.from_config(config).close()
    except DatabaseUnreachable as exc:
        log.warning("database unreachable at start: recording starts without it; analysis, "
                    "alerts and the API's database parts wait for it", error=str(exc))


def check_secret_files(config: Config) -> None:
    """The notifier reads these files; one that cannot be read is one line now."""
    files = [("mqtt.password_file", config.mqtt.password_file)] if config.mqtt.enabled else []
    files += [(f"alerts.rules[{n}].webhook_secret_file", rule.webhook_secret_file)
              for n, rule in enumerate(config.alerts.rules)]
    for key, path in files:
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{config.source}: {key}: cannot read {path}: "
                              f"{exc.strerror or exc}") from None


def share_with_children(config: Config) -> None:
    """Import what the children run, once, in the supervisor: each fork then shares those
    pages (spawn settles them first, see settle_memory)."""
    for module in CHILD_MODULES:
        importlib.import_module(module)
    if config.analysis.workers:
        registry.load_sdks(config.providers)


def settle_memory() -> None:
    """Right before a fork. Frozen objects are never written by a child's garbage collector
    (a write would copy their page into the child). Trimming hands malloc's free chunks
    back to the kernel; left in place, the child's first large allocation would coalesce
    them all, writing to, and so copying, pages across the whole heap."""
    gc.collect()
    gc.freeze()
    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def tune_malloc() -> None:
    """Set MALLOC_SETTINGS with mallopt for this process and the children it forks, and
    in the environment for the programs they run (FFmpeg). A value already in the
    environment (say, from the unit file) wins."""
    mallopt = glibc_function("mallopt")
    for parameter, variable, default in MALLOC_SETTINGS:
        value = os.environ.setdefault(variable, str(default))
        if mallopt is not None and value.isdigit():
            mallopt(parameter, int(value))


def glibc_function(name: str):
    """A function of the C library, or None where it is not glibc (whose allocator then
    has its own policy, and these tunings do not apply)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def describe_exit(code: int | None) -> dict[str, Any]:
    if code is None:
        return {}
    if code < 0:
        return {"signal": signal.Signals(-code).name}
    return {"exitcode": code}


def file_size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_tail(path, offset: int) -> str:
    """What a child's stack file holds past offset (bounded: the log gets a stack, not
    a flood)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(STACK_BYTES)
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def drain(fd: int) -> None:
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


