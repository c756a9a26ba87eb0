"""What vlmguard reports about itself, gathered once into plain data.

`vlmguard status`, the REST API and /metrics all show the same facts under the same keys.
Everything comes from what the processes share: the job table, the files under data_dir,
and the small state files the running processes keep in the RAM folder. So the report
works whether or not the daemon is running, and says which.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from vlmguard.config import Config
from vlmguard.errors import DatabaseError, UnusableDatabase, first_line
from vlmguard.health import read_states
from vlmguard.layout import Layout, archive_start
from vlmguard.livelist import live_age
from vlmguard.livestate import camera_online, daemon_pid, exit_text
from vlmguard.store.bundle import Store
from vlmguard.store.engines import is_outage, redact_url
from vlmguard.store.records import Job, utcnow
from vlmguard.store.schema import STATES
from vlmguard.times import iso, iso_epoch
from vlmguard.vlm import token_report

GB = 1_000_000_000
RECENT_FAILURES = 5


def hls_url(config: Config, camera_id: str) -> str:
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = os.uname().nodename
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}/live/{camera_id}/index.m3u8"


def live_cameras(config: Config) -> list[dict[str, Any]]:
    """The cameras part of the report alone: files only, no database, no archive scan."""
    states = read_states(config.data_dir) if daemon_pid(config.data_dir) else {}
    return camera_report(config, states.get("streamer", {}).get("cameras", {}),
                         states.get("supervisor", {}).get("children", {}).get("streamer"))


def gather_status(config: Config, store: Store | None = None,
                  unreachable: str | None = None) -> dict[str, Any]:
    """The report; with unreachable (why the database cannot be read now), from the
    files alone."""
    data_dir = config.data_dir
    pid = daemon_pid(data_dir)
    states = read_states(data_dir) if pid else {}
    supervisor = states.get("supervisor", {})
    report: dict[str, Any] = {
        "config": str(config.source),
        "daemon": {"running": pid is not None, "pid": pid,
                   "since": iso_epoch(supervisor.get("started_at")),
                   "children": supervisor.get("children", {}),
                   # Bugs each process caught so that it could go on (see child.py).
                   "unexpected_errors": {name: state.get("unexpected_errors", 0)
                                         for name, state in states.items()}},
        "database": {"url": redact_url(config.database_url), "ready": False, "error": None,
                     "waiting": database_waits(states),
                     "quarantined": {"rows": {}, "total": 0, "latest": []}},
        "cameras": camera_report(config, states.get("streamer", {}).get("cameras", {}),
                                 supervisor.get("children", {}).get("streamer")),
        "archives": archive_report(config),
        "jobs": dict.fromkeys(STATES, 0) | {"by_camera": {}, "oldest_pending_age_s": None},
        "workers": worker_report(states),
        "failures": [],
        "tokens": {"today": {}, "last_24h": {}},
        "analysis": {"paused": [], "providers": {}, "adapted": adapted_report(states)},
        "ram": ram_report(config, states.get("archiver", {})),
        "alerts": {},
        "node": config.node_name,
        "nodes": [],
    }
    for child in report["daemon"]["children"].values():  # the state file keeps the epoch
        child["backed_off_since"] = iso_epoch(child.get("backed_off_since"))
    try:
        if unreachable:
            raise DatabaseError(unreachable)
        opened = store or Store.from_config(config, create=False)
    except UnusableDatabase:
        raise  # not "no database yet" but one a person must repair: one line, exit 2
    except DatabaseError as exc:
        report["database"]["error"] = str(exc)
    else:
        try:
            fill_from_table(report, opened)
        except Exception as exc:
            if not is_outage(exc):
                raise
            report["database"]["ready"] = False
            report["database"]["error"] = f"database unreachable: {first_line(exc)}"
        finally:
            if store is None:
                opened.close()
    for camera in report["cameras"]:
        lag = camera["analysis_lag_s"]
        camera["lagging"] = lag is not None and lag > config.analysis.max_lag_seconds
    report["problems"] = problems(report)
    report["healthy"] = not report["problems"]
    return report


def fill_from_table(report: dict[str, Any], store: Store) -> None:
    report["database"]["ready"] = True
    counts = store.reports.counts()
    for states in counts.values():
        for state, n in states.items():
            report["jobs"][state] += n
    report["jobs"]["by_camera"] = counts
    report["jobs"]["oldest_pending_age_s"] = age_seconds(store.reports.oldest_pending())
    report["failures"] = [job_summary(job)
                          for job in store.reports.recent_failures(RECENT_FAILURES)]
    report["analysis"]["paused"] = [
        {"provider": p.provider, "reason": p.reason, "detail": p.detail,
         "since": iso(p.paused_at), "next_probe": iso(p.probe_at)}
        for p in store.pauses.paused_providers()]
    report["analysis"]["providers"] = provider_report(store)
    lags, merged = store.queue.lag_seconds(), store.reports.merge_counts()
    for camera in report["cameras"]:
        camera["analysis_lag_s"] = round(lags.get(camera["id"], 0.0), 1)
        camera["windows_merged"] = merged.get(camera["id"], 0)
    report["alerts"] = alerts_report(store)
    report["archives"]["kept"] = kept_report(store.recordings.kept_paths())
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    report["tokens"] = {"today": store.reports.token_usage(midnight),
                        "last_24h": store.reports.token_usage(now - timedelta(hours=24))}
    report["database"]["quarantined"] = store.quarantine.quarantined()
    report["nodes"] = [dict(n, started_at=iso(n["started_at"]),
                            heartbeat_at=iso(n["heartbeat_at"]))
                       for n in store.nodes.all()]


def database_waits(states: dict[str, dict]) -> dict[str, str]:
    """{process: "database unreachable since ..."} for the processes waiting for it."""
    waits = {name: state["database"] for name, state in states.items()
             if isinstance(state.get("database"), str)}
    waits.update({name: state["state"] for name, state in states.items()
                  if name.startswith("analyzer-")
                  and str(state.get("state", "")).startswith("waiting: database")})
    return waits


def backed_off(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The roles in a crash loop that the supervisor backs off, with their state."""
    if not report["daemon"]["running"]:
        return []
    return [(name, child) for name, child in report["daemon"]["children"].items()
            if child.get("state") == "backed off"]


def alerts_report(store: Store) -> dict[str, dict[str, Any]]:
    """Per alert destination: pending, delivered, failed, suppressed and the last error."""
    return {name: counts | {"last_error_at": iso(counts["last_error_at"])}
            for name, counts in sorted(store.reports.delivery_counts().items())}


def provider_report(store: Store) -> dict[str, dict[str, Any]]:
    """Per provider: clips answered (and tokens), failed requests, pause and why."""
    answers = store.reports.answers_by_provider()
    states = {p.provider: p for p in store.pauses.provider_states()}
    out = {}
    for name in sorted(set(answers) | set(states)):
        state = states.get(name)
        out[name] = {
            "answered": answers.get(name, {}).get("answered", 0),
            "tokens": answers.get(name, {}).get("tokens", 0),
            "models": answers.get(name, {}).get("models", []),
            "failed": state.failures if state else 0,
            "last_error": state.last_error if state else None,
            "last_error_at": iso(state.last_error_at) if state else None,
            "paused": state.reason if state and state.paused else None,
            "paused_detail": state.detail if state and state.paused else None,
        }
    return out


def camera_report(config: Config, live: dict[str, Any], streamer: dict | None) -> list[dict]:
    layout = Layout(config.data_dir)
    cameras = []
    for camera in config.cameras:
        reported = live.get(camera.id, {})
        age = live_age(layout, camera.id, config.storage.live_segments)
        cameras.append({
            "id": camera.id,
            "online": camera_online(config, streamer, age),
            "segment_age_s": round(age, 1) if age != float("inf") else None,
            "ffmpeg_restarts": reported.get("restarts", 0),
            "mode": reported.get("mode"),
            # How the live URL is served: "ll-hls (parts of up to 0.230 s)", or "hls (...)"
            # saying why there are no parts.
            "live": reported.get("live"),
            # "ok", or "archiving stopped: <reason>" while FFmpeg's archive output is down.
            "archiving": reported.get("archiving", "ok"),
            "hls_url": hls_url(config, camera.id),
            # Now minus the end of the oldest unanalysed footage (None: no job table).
            "analysis_lag_s": None,
            "windows_merged": 0,
        })
    return cameras


def ram_report(config: Config, archiver: dict[str, Any]) -> dict[str, Any]:
    """The RAM folder (live segments, analysis windows), as the archiver last measured it."""
    return {"folder": str(Layout(config.data_dir).ram), "bytes": archiver.get("ram_bytes"),
            "windows_max_bytes": config.storage.ram_max_mb * 1_000_000,
            "windows_evicted": archiver.get("windows_evicted", 0)}


def archive_report(config: Config) -> dict[str, Any]:
    layout = Layout(config.data_dir)
    count = size = 0
    oldest = None
    for camera in config.cameras:
        try:
            entries = list(layout.archives(camera.id).iterdir())
        except FileNotFoundError:
            continue
        for path in entries:
            start = archive_start(path)
            if start is None:
                continue
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue
            count += 1
            oldest = min(oldest, start) if oldest else start
    try:
        free = shutil.disk_usage(config.data_dir).free
    except FileNotFoundError:
        free = None
    return {"count": count, "bytes": size, "oldest": iso(oldest),
            "budget_bytes": int(config.storage.max_disk_gb * GB) or None,
            "disk_free_bytes": free, "min_free_bytes": int(config.storage.min_free_gb * GB)}


def kept_report(paths: set[str]) -> dict[str, int]:
    """Archives kept out of retention by hand: how many, and the bytes still on disk."""
    size = 0
    for path in paths:
        try:
            size += Path(path).stat().st_size
        except OSError:
            continue
    return {"count": len(paths), "bytes": size}


def adapted_report(states: dict[str, dict]) -> dict[str, dict[str, str]]:
    """What running analyzers' provider clients changed to suit their servers (a smaller
    context, max_completion_tokens, a thinking level), by provider."""
    found: dict[str, dict[str, str]] = {}
    for name, state in states.items():
        adapted = state.get("adapted") if name.startswith("analyzer-") else None
        if isinstance(adapted, dict) and pid_alive(state.get("pid")):
            for provider, notes in adapted.items():
                if isinstance(notes, dict):
                    found.setdefault(str(provider), {}).update(
                        {str(k): str(v) for k, v in notes.items()})
    return found


def worker_report(states: dict[str, dict]) -> list[dict[str, Any]]:
    workers = []
    for name, state in states.items():
        if not name.startswith("analyzer-"):
            continue
        text = str(state.get("state", ""))
        workers.append({
            "name": name, "worker_id": state.get("worker_id"), "pid": state.get("pid"),
            "alive": pid_alive(state.get("pid")), "state": text,
            "job_id": int(text[4:]) if text.startswith("job ") and text[4:].isdigit() else None,
            "last_update": iso_epoch(state.get("updated")),
        })
    return workers


def problems(report: dict[str, Any]) -> list[str]:
    found = []
    if not report["daemon"]["running"]:
        found.append("daemon not running")
    if report["database"]["error"]:
        found.append(report["database"]["error"])
    elif report["daemon"]["running"] and report["database"]["waiting"]:
        found.append(f"processes waiting for the database: "
                     f"{', '.join(sorted(report['database']['waiting']))}")
    for name, child in backed_off(report):
        found.append(f"{name} is crash-looping (last: {exit_text(child.get('last_exit'))}): "
                     "backed off and retried; live video and recording go on")
    quarantined = report["database"]["quarantined"]["total"]
    if quarantined:
        found.append(f"{quarantined} unreadable row(s) quarantined and skipped "
                     "(vlmguard status --json lists them)")
    for camera in report["cameras"]:
        if report["daemon"]["running"] and not camera["online"]:
            found.append(f"camera {camera['id']} offline")
        if report["daemon"]["running"] and camera["archiving"] != "ok":
            found.append(f"camera {camera['id']} {camera['archiving']}")
        if report["daemon"]["running"] and camera.get("lagging"):
            found.append(f"camera {camera['id']} analysis lags "
                         f"{format_age(camera['analysis_lag_s'])} (more than "
                         "analysis.max_lag_seconds: waiting windows are merged)")
    for pause in report["analysis"]["paused"]:
        found.append(f"analysis paused ({pause['provider']}): {pause['reason']}: {pause['detail']}")
    waiting = {w["state"] for w in report["workers"] if w["state"].startswith("waiting")}
    found.extend(sorted(waiting))
    day_ago = utcnow() - timedelta(hours=24)
    recent = [f for f in report["failures"]
              if f["completed_at"] and datetime.fromisoformat(f["completed_at"]) >= day_ago]
    if recent:
        found.append(f"{len(recent)} job(s) failed in the last 24 h")
    failing = [name for name, d in report.get("alerts", {}).items()
               if d["failed"] and d["last_error_at"]
               and datetime.fromisoformat(d["last_error_at"]) >= utcnow() - timedelta(hours=24)]
    if failing:
        found.append(f"alert deliveries failed in the last 24 h: {', '.join(failing)}")
    archives = report["archives"]
    if archives["disk_free_bytes"] is not None and archives["disk_free_bytes"] < archives["min_free_bytes"]:
        found.append("disk below min_free_gb")
    return found


def pid_alive(pid: Any) -> bool:
    return isinstance(pid, int) and Path(f"/proc/{pid}").exists()


def age_seconds(when: datetime | None) -> float | None:
    return round((utcnow() - when).total_seconds(), 1) if when else None


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "camera_id": job.camera_id, "status": job.status,
        "segment_start": iso(job.segment_start), "segment_end": iso(job.segment_end),
        "retry_count": job.retry_count, "max_retries": job.max_retries,
        "worker_id": job.worker_id, "safety_score": job.safety_score,
        "incident_count": job.incident_count, "error_message": job.error_message,
        "video_path": job.video_path, "created_at": iso(job.created_at),
        "completed_at": iso(job.completed_at),
    }


def job_detail(job: Job, incident_rows: list[dict[str, Any]]) -> dict[str, Any]:
    return job_summary(job) | {
        "started_at": iso(job.started_at), "run_after": iso(job.run_after),
        "lease_expires_at": iso(job.lease_expires_at), "analysis_seconds": job.analysis_seconds,
        "tokens": token_report(job),
        "model_version": job.model_version,
        "provider": job.provider, "model": job.model,
        # What the job covers: an archive, a window, merged windows or catch-up; its
        # clip's first frame; the archive file(s) and offsets, to play an incident back.
        "kind": job.kind, "windows": job.windows, "sources": job.sources,
        "clip_start": iso(job.first_frame_at),
        "analysis_result": job.analysis_result,
        "incidents": [incident_row(row) for row in incident_rows],
    }


def incident_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: iso(value) if isinstance(value, datetime) else value for key, value in row.items()}


def camera_homes(config: Config, nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """camera id -> the node that records it, for the cameras of other boxes (this box's
    own cameras are served here)."""
    homes = {camera: node for node in nodes if node["name"] != config.node_name
             for camera in node["cameras"]}
    for camera in config.cameras:
        homes.pop(camera.id, None)
    return homes


def other_cameras(config: Config, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cameras other boxes record, each with its node and whether that node is alive
    (all that is known here of them), and its live URL on its own box."""
    return [{"id": camera, "node": node["name"], "node_alive": node["alive"],
             "online": node["alive"],
             "hls_url": f"{node['public_url']}/live/{camera}/index.m3u8",
             "console_url": f"{node['public_url']}/"}
            for camera, node in camera_homes(config, nodes).items()]


def with_home(row: dict[str, Any], homes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An incident row with the node that recorded it and, for another box's camera,
    its snapshot and clip on that box's server (same token) and that box's console, where
    its recordings are browsed."""
    home = homes.get(row.get("camera_id"))
    if home is None:
        return dict(row, node=None, snapshot_url=f"/api/incidents/{row['id']}/snapshot.jpg",
                    clip_url=f"/api/incidents/{row['id']}/clip.mp4", console_url=None)
    base = f"{home['public_url']}/api/incidents/{row['id']}"
    return dict(row, node=home["name"], snapshot_url=f"{base}/snapshot.jpg",
                clip_url=f"{base}/clip.mp4", console_url=f"{home['public_url']}/")


def render_status(report: dict[str, Any]) -> str:
    daemon = report["daemon"]
    lines = [f"vlmguard  {'running, pid ' + str(daemon['pid']) + ' since ' + str(daemon['since']) if daemon['running'] else 'NOT RUNNING (figures from the database and files)'}",
             f"database  {report['database']['url']}"]
    if report["database"]["error"]:
        lines.append(f"          {report['database']['error']}")
    for name, why in sorted(report["database"]["waiting"].items()):
        lines.append(f"          {name} waiting: {why}")
    for row in report["database"]["quarantined"]["latest"]:
        lines.append(f"          quarantined: {row['table']} row {row['id']}: {row['reason']}")
    for name, child in backed_off(report):
        lines.append(f"role      {name} BACKED OFF since {child['backed_off_since']} "
                     f"(crash loop, last: {exit_text(child.get('last_exit'))}); next try in "
                     f"{child.get('next_try_in_s')} s")
    for node in report.get("nodes", []):
        seen = "alive" if node["alive"] else (
            f"DOWN, last seen {format_age(node['last_seen_s'])} ago"
            + (" (stopped)" if node["stopped"] else ""))
        this = " (this box)" if node["name"] == report.get("node") else ""
        cameras = f", cameras {' '.join(node['cameras'])}" if node["cameras"] else ""
        lines.append(f"node      {node['name']}{this}: {seen}, {node['role']}, "
                     f"{node['public_url']}{cameras}")
    lines.append("cameras")
    for camera in report["cameras"]:
        age = "-" if camera["segment_age_s"] is None else format_age(camera["segment_age_s"])
        lines.append(f"  {camera['id']:<16} {'live' if camera['online'] else 'OFFLINE':<8} "
                     f"segment {age:>5} old  ffmpeg restarts {camera['ffmpeg_restarts']}  "
                     f"{lag_text(camera)}{camera['hls_url']}")
        if camera.get("live"):
            lines.append(f"  {'':<16} {camera['live']}")
    ram = report["ram"]
    if ram["bytes"] is not None:
        lines.append(f"ram       {ram['bytes'] / 1e6:.1f} MB in {ram['folder']} (live segments and "
                     f"windows; windows at most {ram['windows_max_bytes'] / 1e6:.0f} MB, "
                     f"{ram['windows_evicted']} dropped to their archive)")
    archives = report["archives"]
    budget = f" of {archives['budget_bytes'] / GB:.1f} GB" if archives["budget_bytes"] else ""
    free = f", {archives['disk_free_bytes'] / GB:.1f} GB free" if archives["disk_free_bytes"] else ""
    kept = archives.get("kept", {}).get("count")
    kept = f", {kept} kept (exempt from retention)" if kept else ""
    lines.append(f"archives  {archives['count']} files, {archives['bytes'] / GB:.2f} GB{budget}{free}"
                 f"{kept}")
    jobs = report["jobs"]
    oldest = (f"  (oldest pending {format_age(jobs['oldest_pending_age_s'])})"
              if jobs["oldest_pending_age_s"] is not None else "")
    lines.append("jobs      " + "  ".join(f"{s} {jobs[s]}" for s in STATES) + oldest)
    for pause in report["analysis"]["paused"]:
        lines.append(f"analysis  PAUSED ({pause['provider']}) since {pause['since']}: "
                     f"{pause['reason']}: {pause['detail']}; next probe {pause['next_probe']} "
                     f"(SIGHUP probes at once)")
    for name, p in report["analysis"].get("providers", {}).items():
        paused = f"  PAUSED: {p['paused']}" if p["paused"] else ""
        error = f"  last error: {p['last_error']}" if p["failed"] and p["last_error"] else ""
        lines.append(f"provider  {name}: answered {p['answered']}, failed {p['failed']}"
                     f"{paused}{error}")
    for name, notes in report["analysis"].get("adapted", {}).items():
        for what, text in notes.items():
            lines.append(f"provider  {name} adapted ({what}): {text}")
    for name, d in report.get("alerts", {}).items():
        error = f"  last error: {d['last_error']}" if d["last_error"] else ""
        lines.append(f"alerts    {name}: pending {d['pending']}, delivered {d['delivered']}, "
                     f"failed {d['failed']}, suppressed {d['suppressed']}{error}")
    if report["workers"]:
        lines.append("analyzers")
        for worker in report["workers"]:
            lines.append(f"  {worker['name']:<12} {'alive' if worker['alive'] else 'DEAD':<6} "
                         f"{worker['state']}")
    tokens = report["tokens"]
    if tokens["last_24h"]:
        lines.append("tokens    " + ", ".join(
            f"{camera}: {tokens['today'].get(camera, {}).get('total', 0):,} today, "
            f"{usage['total']:,} in 24 h" for camera, usage in tokens["last_24h"].items()))
    if report["failures"]:
        lines.append("last failures")
        for job in report["failures"]:
            lines.append(f"  job {job['id']} {job['camera_id']} {job['segment_start']}: "
                         f"{job['error_message']}")
    lines.append("healthy" if report["healthy"] else "needs attention: " + "; ".join(report["problems"]))
    return "\n".join(lines)


def lag_text(camera: dict[str, Any]) -> str:
    if camera.get("analysis_lag_s") is None:
        return ""
    merged = f", {camera['windows_merged']} windows merged" if camera["windows_merged"] else ""
    return f"analysis lag {format_age(camera['analysis_lag_s'])}{merged}  "


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
