"""The boxes that share one database: the `nodes` table and every statement on it.

Each `vlmguard run` is a node: a row with its name (daemon.node), the id of this start
(instance), where its server is reached (public_url, the base of links to its footage),
its version, role and cameras, and a heartbeat the supervisor writes every few seconds.
A node whose heartbeat is older than ALIVE_SECONDS is down: its name may be taken by a
new start, and its jobs wait for it (their footage is on its disk).

The table is in schema.py with the others; Nodes speaks through a Database's
transactions, like every other part of the store.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from vlmguard import __version__
from vlmguard.errors import StartupError
from vlmguard.store.records import utcnow
from vlmguard.store.schema import nodes

# The supervisor beats every 5 s (its status line); a node silent six beats is down.
ALIVE_SECONDS = 30.0
MAX_CAMERAS_LISTED = 500


def box_id(data_dir: Path) -> str:
    """This data directory's id, made at its first start: what tells a restart of this
    box (after a crash, its heartbeat still fresh) from another box using its name."""
    path = Path(data_dir) / "node-id"
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if len(found) == 32 and all(c in "0123456789abcdef" for c in found):
        return found
    made = secrets.token_hex(16)
    path.write_text(made + "\n")
    return made


class NodeTaken(StartupError):
    """Another live vlmguard holds this node name."""


@dataclass(frozen=True)
class NodeInfo:
    """What one start of vlmguard says about itself."""

    name: str
    instance: str
    public_url: str
    role: str
    cameras: tuple[str, ...]
    box: str = ""
    # Each camera's prompt, so an analyzer on another box asks what this box would.
    prompts: tuple[str, ...] = ()
    version: str = __version__

    @classmethod
    def of(cls, config: Any, instance: str | None = None, box: str = "") -> "NodeInfo":
        return cls(name=config.node_name, instance=instance or secrets.token_hex(8), box=box,
                   public_url=config.public_url, role=config.node_role,
                   cameras=tuple(c.id for c in config.cameras),
                   prompts=tuple(c.prompt for c in config.cameras))

    def values(self, now: datetime) -> dict[str, Any]:
        return dict(instance=self.instance, box=self.box or None,
                    public_url=self.public_url[:500],
                    version=self.version[:50], role=self.role,
                    cameras=[{"id": c, "prompt": p} for c, p in
                             zip(self.cameras[:MAX_CAMERAS_LISTED],
                                 self.prompts or ("",) * len(self.cameras))],
                    heartbeat_at=now, stopped_at=None)


def is_alive(row: Any, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return (row.stopped_at is None and row.heartbeat_at is not None
            and now - row.heartbeat_at < timedelta(seconds=ALIVE_SECONDS))


def node_dict(row: Any, now: datetime) -> dict[str, Any]:
    cameras = [c for c in (row.cameras if isinstance(row.cameras, list) else [])
               if isinstance(c, dict) and isinstance(c.get("id"), str)]
    return {"name": row.name, "alive": is_alive(row, now), "role": row.role,
            "version": row.version, "public_url": row.public_url,
            "cameras": [c["id"] for c in cameras],
            "prompts": {c["id"]: str(c.get("prompt") or "") for c in cameras},
            "started_at": row.started_at, "heartbeat_at": row.heartbeat_at,
            "last_seen_s": round((now - row.heartbeat_at).total_seconds(), 1),
            "stopped": row.stopped_at is not None}


class Nodes:
    """The nodes table on one Database."""

    def __init__(self, db: Any):
        self.db = db

    def join(self, node: NodeInfo, *, restart: bool = True) -> None:
        """Take the node's name for this start; NodeTaken when another live start holds it
        (restart: unless that start was this box's, which the data-dir lock says is gone)."""
        now = utcnow()
        with self.db.write() as conn:
            row = conn.execute(select(nodes).where(nodes.c.name == node.name)
                               .with_for_update()).first()
            if row is not None and row.instance != node.instance and is_alive(row, now) \
                    and not (restart and node.box and row.box == node.box):
                raise NodeTaken(
                    f"node name {node.name!r} is held by another running vlmguard (its server "
                    f"{row.public_url}, last heartbeat {(now - row.heartbeat_at).seconds} s "
                    "ago); set daemon.node to a name of its own")
            conn.execute(delete(nodes).where(nodes.c.name == node.name))
            conn.execute(nodes.insert().values(name=node.name, started_at=now,
                                               **node.values(now)))

    def heartbeat(self, node: NodeInfo) -> bool:
        """Say this node is alive; False when another live start has taken its name
        (this one was silent too long)."""
        now = utcnow()
        with self.db.write() as conn:
            done = conn.execute(update(nodes).where(nodes.c.name == node.name,
                                                    nodes.c.instance == node.instance)
                                .values(**node.values(now))).rowcount
        if done:
            return True
        try:
            self.join(node, restart=False)  # the row was removed, or taken and left stale
        except NodeTaken:
            return False
        return True

    def leave(self, node: NodeInfo) -> None:
        """An orderly stop: down at once (its jobs wait for it, its name is free)."""
        with self.db.write() as conn:
            conn.execute(update(nodes).where(nodes.c.name == node.name,
                                             nodes.c.instance == node.instance)
                         .values(stopped_at=utcnow()))

    def get(self, name: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            row = conn.execute(select(nodes).where(nodes.c.name == name)).first()
        return node_dict(row, utcnow()) if row is not None else None

    def all(self) -> list[dict[str, Any]]:
        """Every node ever seen, by name, alive or with when it was last seen."""
        now = utcnow()
        with self.db.read() as conn:
            rows = conn.execute(select(nodes).order_by(nodes.c.name)).all()
        return [node_dict(row, now) for row in rows]
