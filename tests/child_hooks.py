"""`vlmguard run` with faults planted in the archiver, for tests/test_child.py.

Run as `python tests/child_hooks.py run --config ...`. The children are forked from this
process, so they carry the plants; each does nothing until the test drops its trigger
file into the data dir:
- hang-archiver: the archiver's loop blocks for good in real Python code, once;
- bug-sidecar: writing an archive's sidecar raises, as a bug would, every time.
"""

from __future__ import annotations

import time
from pathlib import Path


def hang_here_for_the_test() -> None:
    while True:
        time.sleep(3600)


def plant() -> None:
    from vlmguard import archiver, recordings

    finalize = archiver.Archiver.finalize_closed

    def finalize_or_hang(self) -> None:
        finalize(self)
        trigger = Path(self.config.data_dir) / "hang-archiver"
        if trigger.exists():
            trigger.unlink()
            hang_here_for_the_test()

    write_sidecar = recordings.write_sidecar

    def write_sidecar_or_fail(layout, *args, **kwargs):
        if (Path(layout.data_dir) / "bug-sidecar").exists():
            raise RuntimeError("a bug planted by the test")
        return write_sidecar(layout, *args, **kwargs)

    archiver.Archiver.finalize_closed = finalize_or_hang
    recordings.write_sidecar = write_sidecar_or_fail


if __name__ == "__main__":
    plant()
    from vlmguard.cli import main

    main()
