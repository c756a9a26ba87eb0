"""The skeleton every supervised child runs in; a role's module supplies only its work.

The supervisor forks and calls bootstrap(), which gives the child what all of them share
and then runs the role's main. A role then uses, from here:

- on_stop(handler): the one way to hear SIGTERM, in a plain loop or in an asyncio one;
- every(seconds, fn): periodic work inside a loop that turns more often;
- ChildState: the state file the child publishes for the supervisor and `vlmguard status`,
  in the RAM folder and written when it changes, not on a timer; and the count
  of unexpected errors: bugs caught so that a loop goes on, each logged with its
  traceback and counted in /metrics (vlmguard_unexpected_errors_total).

Every child also has faulthandler on: on SIGUSR1 it writes the Python stack of each of
its threads to its stack file (run/<name>.stack in the RAM folder), and on a fatal signal
(SIGSEGV, SIGABRT ...) the stack it died in. Before the supervisor kills a hung child it
asks for that stack and logs it (see Supervisor.murder_hung): a dump is written by the
signal handler in C, so it arrives while the child's Python code is stuck anywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from vlmguard.errors import VlmguardError
from vlmguard.health import run_dir, write_state
from vlmguard.logs import get_logger

log = get_logger("vlmguard.child")

STACK_SIGNAL = signal.SIGUSR1
PR_SET_PDEATHSIG = 1


def stack_file(data_dir: Path, name: str) -> Path:
    """Where child `name` writes its stack when asked (or when it dies of a fatal signal)."""
    return run_dir(data_dir) / f"{name}.stack"


def bootstrap(entry: Callable[..., None], *args: Any, lifeline: int | None = None,
              stack_path: str | None = None) -> None:
    """First code in every supervised child: fresh signal dispositions, stack dumps on,
    then its main.

    SIGINT is ignored so that Ctrl-C on a terminal reaches only the supervisor, which
    then stops the children in order; SIGTERM stays the way to stop a child. SIGHUP is
    ignored too: when the supervisor dies and leaves a stopped child behind, the kernel
    sends SIGHUP (then SIGCONT) to the orphaned process group, and the default action
    would kill every child before the parent watch could stop it in order.
    """
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, STACK_SIGNAL):
        signal.signal(signum, signal.SIG_DFL)
    name_process(multiprocessing.current_process().name)
    if stack_path is not None:
        dump_stacks_to(Path(stack_path))
    stop_when_parent_dies(lifeline)
    try:
        entry(*args)
    except VlmguardError as exc:
        # A problem a person must fix (a database from a newer vlmguard, say): one line.
        get_logger("vlmguard").error("cannot run", error=str(exc))
        sys.exit(1)


def dump_stacks_to(path: Path) -> None:
    """faulthandler into path, on SIGUSR1 and on a fatal signal. The file stays open for
    the child's life (faulthandler writes to its descriptor from a signal handler)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w")
    except OSError as exc:
        log.warning("no stack file: a hung child's stack goes to stderr", path=str(path),
                    error=exc.strerror or str(exc))
        handle = sys.stderr
    faulthandler.enable(file=handle, all_threads=True)
    faulthandler.register(STACK_SIGNAL, file=handle, all_threads=True, chain=False)


def stop_when_parent_dies(lifeline: int | None = None) -> None:
    """SIGTERM ourselves when the parent goes, even by SIGKILL: the orderly stop then runs.

    lifeline is the read end of a pipe whose write end only the supervisor holds (see
    Supervisor.lifeline); without one, multiprocessing's parent sentinel serves.
    """
    if lifeline is None:
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        lifeline = parent.sentinel
    wake_when_parent_dies()

    def watch() -> None:
        multiprocessing.connection.wait([lifeline])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def wake_when_parent_dies() -> None:
    """Have the kernel send SIGCONT when the parent dies. A stopped child (SIGSTOP, a
    debugger) runs no code, so its watch thread cannot see the parent go; the kernel's
    parent-death signal reaches it all the same, and of the two signals that move a
    stopped process only SIGCONT keeps the orderly stop: the child resumes, its watch
    thread finds the lifeline closed and it stops itself in order. SIGKILL would cut
    that short (an open archive, a leased job). A running child ignores SIGCONT."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGCONT), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a stopped child stays until someone continues or kills it


def name_process(name: str) -> None:
    """Show the child's role in top, pgrep and `ps -o comm` (the kernel keeps 15 bytes):
    forked children all carry the supervisor's command line."""
    try:
        Path("/proc/self/comm").write_text(name[:15])
    except OSError:
        pass  # not Linux: the name is only a convenience


def on_stop(handler: Callable[[], None]) -> None:
    """Call handler when SIGTERM arrives.

    Called from a running asyncio loop, the handler runs in that loop (so it may set an
    asyncio.Event); otherwise it runs in the main thread between two bytecodes of
    whatever it was doing, so it may raise to cut that short (the analyzer's Stopping).
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        signal.signal(signal.SIGTERM, lambda _signum, _frame: handler())
    else:
        loop.add_signal_handler(signal.SIGTERM, handler)


class Every:
    """fn(), at most once per `seconds`, from a loop that turns more often; the first call
    runs at once. Calling it returns whether fn ran."""

    def __init__(self, seconds: float, fn: Callable[[], Any]):
        self.seconds = seconds
        self.fn = fn
        self.last: float | None = None

    def __call__(self) -> bool:
        if self.last is not None and time.monotonic() - self.last < self.seconds:
            return False
        self.fn()
        # From when fn ended: a slow run does not make the next one due at once.
        self.last = time.monotonic()
        return True


def every(seconds: float, fn: Callable[[], Any]) -> Every:
    return Every(seconds, fn)


class ChildState:
    """The state file of child `name` and its count of unexpected errors, which the file
    carries for /metrics. Without a name (a part run outside the supervisor, in a test
    or a CLI command), nothing is written: errors are still logged and counted.

    publish() writes only when what it would write differs from what it last wrote:
    the file says how the child is, not that it is alive (the heartbeat does that).
    Threads may publish and count at once (the analyzer's lease keeper).
    """

    def __init__(self, data_dir: Path | None = None, name: str | None = None):
        self.data_dir = data_dir
        self.name = name
        self.state: dict[str, Any] = {}
        self.unexpected_errors = 0
        self.written: str | None = None
        self.seen: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def publish(self, state: dict[str, Any] | None = None) -> None:
        with self.lock:
            if state is not None:
                self.state = state
            full = self.state | {"unexpected_errors": self.unexpected_errors}
            # Compared as text: a state may hold a dict its owner changes in place.
            text = json.dumps(full, sort_keys=True, default=str)
            if self.name is None or self.data_dir is None or text == self.written:
                return
            write_state(self.data_dir, self.name, full)
            self.written = text

    def unexpected(self, logger, event: str, **fields: Any) -> None:
        """A bug caught so that a loop goes on (call from the except block): one more in
        vlmguard_unexpected_errors_total, and the traceback in the log the first time this
        event meets this kind of exception; a repeat is one line (a loop that retries
        every few seconds must not fill the journal with the same traceback)."""
        kind = type(sys.exc_info()[1]).__name__
        with self.lock:
            self.unexpected_errors += 1
            first = (event, kind) not in self.seen
            self.seen.add((event, kind))
        if first:
            logger.exception(event, **fields)
        else:
            error = traceback.format_exception_only(sys.exc_info()[1])[-1].strip()
            logger.error(event, error=error[:300], again=True, **fields)
        self.publish()
