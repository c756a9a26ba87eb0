"""Where the web side writes the clips and exports it makes: RAM (/dev/shm) where there is
one, since they are copies and on flash they would cost writes for nothing, and only as
much as leaves the recording its memory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

RAM_DIR = Path("/dev/shm")
MEMORY_RESERVE = 256 * 2**20


def room_for(size: int) -> bool:
    """A clip in RAM must leave the recording its memory: the tmpfs must hold it and the
    machine keep MEMORY_RESERVE available besides."""
    try:
        free = shutil.disk_usage(ram_dir() or tempfile.gettempdir()).free
    except OSError:
        return True  # cannot tell: FFmpeg's own error on a full disk is the limit
    available = memory_available()
    return size * 1.1 < free and (available is None or size * 1.1 + MEMORY_RESERVE < available)


def memory_available() -> int | None:
    """MemAvailable (free plus reclaimable cache), in bytes; None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ram_dir() -> str | None:
    """Clips are copies: kept in RAM, they cost the flash nothing."""
    return str(RAM_DIR) if RAM_DIR.is_dir() else None
