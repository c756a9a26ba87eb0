"""Provider state shared by every analyzer on every box: an account-wide pause (bad key,
daily quota, retired model) with its probe time, a shared rate-limit wait, and the count of
failed requests, which a fallback to the next provider leaves nowhere else.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from vlmguard.store.database import Database
from vlmguard.store.records import Pause, utcnow
from vlmguard.store.schema import pauses


class Pauses:
    """The provider_pauses table."""

    def __init__(self, db: Database):
        self.db = db

    def pause(self, provider: str, reason: str, detail: str, probe_in: float) -> None:
        """Stop every analyzer of this provider until a probe at now + probe_in succeeds."""
        now = utcnow()
        with self.db.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider)
                         .values(reason=reason, detail=detail[:2000], paused_at=now,
                                 probe_at=now + timedelta(seconds=probe_in)))

    def hold_off(self, provider: str, seconds: float) -> None:
        """A shared rate-limit wait: no analyzer of this provider calls before now + seconds."""
        until = utcnow() + timedelta(seconds=seconds)
        with self.db.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider,
                                              (pauses.c.not_before.is_(None))
                                              | (pauses.c.not_before < until))
                         .values(not_before=until))

    def _provider_row(self, conn: Connection, provider: str) -> None:
        """Make sure the provider has its row; two boxes may race to insert it."""
        conn.execute(self.db.insert(pauses).values(provider=provider)
                     .on_conflict_do_nothing(index_elements=["provider"]))

    def provider_state(self, provider: str) -> Pause | None:
        with self.db.read() as conn:
            row = conn.execute(select(pauses).where(pauses.c.provider == provider)).first()
        return Pause(**row._mapping) if row else None

    def take_probe(self, provider: str, next_probe_in: float) -> bool:
        """True for the one analyzer that gets to probe a due pause; the next probe is
        pushed on in the same statement, so two workers never probe at once."""
        now = utcnow()
        with self.db.write() as conn:
            return bool(conn.execute(
                update(pauses).where(pauses.c.provider == provider, pauses.c.reason.is_not(None),
                                     pauses.c.probe_at <= now)
                .values(probe_at=now + timedelta(seconds=next_probe_in))).rowcount)

    def probe_now(self, provider: str | None = None) -> int:
        """Make paused providers' next probe due at once (the supervisor's SIGHUP)."""
        query = update(pauses).where(pauses.c.reason.is_not(None))
        if provider:
            query = query.where(pauses.c.provider == provider)
        with self.db.write() as conn:
            changed = conn.execute(query.values(probe_at=utcnow())).rowcount
            if changed:
                self.db.notify(conn)
        return changed

    def resume(self, provider: str) -> bool:
        """Clear the pause (a probe succeeded); True when there was one."""
        with self.db.write() as conn:
            changed = conn.execute(update(pauses).where(pauses.c.provider == provider,
                                                        pauses.c.reason.is_not(None))
                                   .values(reason=None, detail=None, paused_at=None,
                                           probe_at=None)).rowcount
            if changed:
                self.db.notify(conn)
        return bool(changed)

    def note_failure(self, provider: str, error: str) -> None:
        """Count a failed request to a provider (the job may still be answered by the next)."""
        with self.db.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider)
                         .values(failures=pauses.c.failures + 1, last_error=error[:2000],
                                 last_error_at=utcnow()))

    def provider_states(self) -> list[Pause]:
        with self.db.read() as conn:
            return [Pause(**row._mapping)
                    for row in conn.execute(select(pauses).order_by(pauses.c.provider))]

    def paused_providers(self) -> list[Pause]:
        with self.db.read() as conn:
            rows = conn.execute(select(pauses).where(pauses.c.reason.is_not(None))
                                .order_by(pauses.c.provider))
            return [Pause(**row._mapping) for row in rows]
