"""How often the processes' state files are rewritten, and where: `vlmguard run` from a
source tree (workers 0, one lavfi camera) for SECONDS after a 15-s start, counting
replacements of run/*.json on the data disk and in the RAM folder by polling their inodes
at 20 Hz (each write is a rename onto the name, so a new inode).

    python bench/state_writes_bench.py TREE SECONDS     # e.g. a `git archive main` copy, 60
"""
import json, os, socket, subprocess, sys, tempfile, time
from pathlib import Path

tree, seconds = Path(sys.argv[1]), float(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="writes-"))
data = work / "data"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
(work / "config.toml").write_text(f"""
[server]
port = {port}
[storage]
data_dir = "{data}"
segment_seconds = 1
archive_seconds = 10
[analysis]
workers = 0
[[cameras]]
id = "cam1"
url = "lavfi:testsrc2=size=320x240:rate=25"
""")
env = {**os.environ, "PYTHONPATH": str(tree)}
env.pop("RUNTIME_DIRECTORY", None)
proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config", str(work / "config.toml")],
                        cwd=tree, env=env, stdout=open(work / "log", "w"), stderr=subprocess.STDOUT)
sys.path.insert(0, str(tree))
from vlmguard.layout import ram_root
folders = [data / "run", ram_root(data) / "run"]
time.sleep(15)  # started
seen, writes, disk_writes = {}, 0, 0
end = time.time() + seconds
while time.time() < end:
    for folder in folders:
        for path in folder.glob("*.json"):
            try:
                ino = path.stat().st_ino
            except OSError:
                continue
            if seen.get(path) not in (None, ino):
                writes += 1
                disk_writes += folder == data / "run"
            seen[path] = ino
    time.sleep(0.05)
proc.terminate(); proc.wait(60)
print(json.dumps({"tree": str(tree), "seconds": seconds, "state_file_writes": writes,
                  "on_data_disk": disk_writes, "per_minute": round(writes * 60 / seconds, 1),
                  "files": sorted(str(p.relative_to(p.parent.parent.parent)) for p in seen)}))
