"""The Prometheus text exposition format, written out from the status report."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vlmguard.store.schema import STATES


def render_metrics(report: dict[str, Any], histogram: tuple[list[tuple[float, int]], int, float],
                   tokens: dict[str, dict[str, int]]) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {format_value(value)}")

    cameras = report["cameras"]
    family("vlmguard_camera_online", "gauge", "1 when the camera's live playlist is fresh.",
           [(label(camera=c["id"]), int(c["online"])) for c in cameras])
    family("vlmguard_camera_segment_age_seconds", "gauge", "Age of the newest live segment.",
           [(label(camera=c["id"]), c["segment_age_s"]) for c in cameras
            if c["segment_age_s"] is not None])
    family("vlmguard_camera_archiving", "gauge",
           "1 while the camera's archive is being written; 0 with the reason it stopped.",
           [(label(camera=c["id"]) if c["archiving"] == "ok"
             else label(camera=c["id"], reason=c["archiving"]), int(c["archiving"] == "ok"))
            for c in cameras])
    family("vlmguard_ffmpeg_restarts_total", "counter",
           "FFmpeg restarts for the camera since the streaming process started.",
           [(label(camera=c["id"]), c["ffmpeg_restarts"]) for c in cameras])
    family("vlmguard_analysis_lag_seconds", "gauge",
           "Now minus the end of the camera's oldest unanalysed footage (0: none waits).",
           [(label(camera=c["id"]), c["analysis_lag_s"]) for c in cameras
            if c.get("analysis_lag_s") is not None])
    family("vlmguard_analysis_windows_merged_total", "counter",
           "Analysis windows merged into longer jobs because the camera's analysis lagged.",
           [(label(camera=c["id"]), c.get("windows_merged", 0)) for c in cameras])
    ram = report.get("ram", {})
    if ram.get("bytes") is not None:
        family("vlmguard_ram_bytes", "gauge",
               "Bytes in the RAM folder: live segments and analysis windows.",
               [("", ram["bytes"])])
        family("vlmguard_windows_evicted_total", "counter",
               "Analysis windows dropped from RAM (over storage.ram_max_mb) to be read from "
               "their archive.", [("", ram["windows_evicted"])])
    family("vlmguard_jobs", "gauge", "Analysis jobs by state.",
           [(label(state=s), report["jobs"][s]) for s in STATES])
    buckets, count, total = histogram
    out.append("# HELP vlmguard_analysis_duration_seconds Claim-to-completion time of analyses.")
    out.append("# TYPE vlmguard_analysis_duration_seconds histogram")
    for bound, n in buckets:
        out.append(f'vlmguard_analysis_duration_seconds_bucket{{le="{format_value(bound)}"}} {n}')
    out.append(f'vlmguard_analysis_duration_seconds_bucket{{le="+Inf"}} {count}')
    out.append(f"vlmguard_analysis_duration_seconds_sum {format_value(total)}")
    out.append(f"vlmguard_analysis_duration_seconds_count {count}")
    family("vlmguard_model_tokens_total", "counter",
           "Model tokens used, by camera and kind, whichever provider answered.",
           [(label(camera=camera, kind=kind), usage[kind]) for camera, usage in tokens.items()
            for kind in ("prompt", "output", "thoughts", "total")])
    providers = report.get("analysis", {}).get("providers", {})
    family("vlmguard_provider_answered_total", "counter",
           "Clips answered by each model provider.",
           [(label(provider=name), p["answered"]) for name, p in providers.items()])
    family("vlmguard_provider_failures_total", "counter",
           "Failed requests to each model provider (down, timed out, 5xx, bad answer).",
           [(label(provider=name), p["failed"]) for name, p in providers.items()])
    paused = report.get("analysis", {}).get("paused", [])
    family("vlmguard_analysis_paused", "gauge",
           "1 while analysis is paused account-wide, labelled with the provider and why.",
           [(label(provider=p["provider"], reason=p["reason"]), 1) for p in paused]
           or [("", 0)])
    alerts = report.get("alerts", {})
    family("vlmguard_alert_deliveries", "gauge",
           "Alert deliveries by destination and state (suppressed: within a rule's cooldown).",
           [(label(destination=name, state=state), d[state]) for name, d in alerts.items()
            for state in ("pending", "delivered", "failed", "suppressed")])
    family("vlmguard_alert_last_error_timestamp_seconds", "gauge",
           "When a destination last failed an attempt (the reason is in vlmguard status).",
           [(label(destination=name), datetime.fromisoformat(d["last_error_at"]).timestamp())
            for name, d in alerts.items() if d["last_error_at"]])
    children = report["daemon"]["children"]
    family("vlmguard_child_restarts_total", "counter",
           "Restarts of each supervised process since vlmguard started.",
           [(label(child=name), state.get("restarts", 0)) for name, state in children.items()])
    family("vlmguard_child_backed_off", "gauge",
           "1 while the process is in a crash loop that the supervisor backs off (video "
           "runs on).",
           [(label(child=name), int(state.get("state") == "backed off"))
            for name, state in children.items()])
    family("vlmguard_unexpected_errors_total", "counter",
           "Bugs a process caught so that its loop goes on, each logged with its traceback "
           "(since that process started).",
           [(label(child=name), n) for name, n in
            sorted(report["daemon"].get("unexpected_errors", {}).items())])
    database = report["database"]
    family("vlmguard_database_up", "gauge",
           "1 when the job table could be read for this report.",
           [("", int(bool(database.get("ready"))))])
    family("vlmguard_database_waiting", "gauge",
           "1 for each process waiting for the database to come back.",
           [(label(process=name), 1) for name in sorted(database.get("waiting", {}))]
           or [("", 0)])
    quarantined = database.get("quarantined", {}).get("rows", {})
    family("vlmguard_quarantined_rows", "gauge",
           "Rows that could not be read, quarantined and skipped, by table.",
           [(label(table=name), n) for name, n in sorted(quarantined.items())])
    nodes = report.get("nodes", [])
    if nodes:
        family("vlmguard_node_up", "gauge",
               "1 while the box (node) sharing this database heartbeats.",
               [(label(node=n["name"]), int(n["alive"])) for n in nodes])
        family("vlmguard_node_last_seen_seconds", "gauge",
               "Seconds since the node's last heartbeat.",
               [(label(node=n["name"]), n["last_seen_s"]) for n in nodes])
    archives = report["archives"]
    family("vlmguard_archive_bytes", "gauge", "Bytes used by archives.", [("", archives["bytes"])])
    family("vlmguard_archives", "gauge", "Archive files on disk.", [("", archives["count"])])
    if archives["disk_free_bytes"] is not None:
        family("vlmguard_disk_free_bytes", "gauge", "Free bytes on the data disk.",
               [("", archives["disk_free_bytes"])])
    family("vlmguard_up", "gauge", "1 when nothing needs attention.", [("", int(report["healthy"]))])
    return "\n".join(out) + "\n"


def label(**labels: str) -> str:
    inner = ",".join(f'{key}="{escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))


def signin_metrics(limiter: Any) -> str:
    """The sign-in counters (web.session.SignInLimiter's) in the Prometheus text format."""
    return ("# HELP vlmguard_signin_failures_total Wrong tokens checked (sign-in form, Bearer "
            "header or ?token=) since the streaming process started.\n"
            "# TYPE vlmguard_signin_failures_total counter\n"
            f"vlmguard_signin_failures_total {limiter.failed_total}\n"
            "# HELP vlmguard_signin_refused_total Requests with a token refused unchecked "
            "(429) because their address had to wait after wrong tokens.\n"
            "# TYPE vlmguard_signin_refused_total counter\n"
            f"vlmguard_signin_refused_total {limiter.refused_total}\n")
