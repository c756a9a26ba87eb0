"""The `vlmguard` command: a thin click layer over config, store and the daemon.

Every problem a user can fix (a bad config, an unreachable database, an unknown job)
comes out as one line on stderr with a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from vlmguard import __version__
from vlmguard.config import check_listen_address, check_server_settings, load_config, masked
from vlmguard.errors import StartupError, VlmguardError
from vlmguard.health import read_states
from vlmguard.layout import Layout
from vlmguard.livestate import daemon_pid
from vlmguard.logs import configure_logging
from vlmguard.redact import redact_text
from vlmguard.status import gather_status, job_detail, job_summary, render_status
from vlmguard.store.bundle import Store
from vlmguard.store.schema import MAX_ID, STATES
from vlmguard.times import iso, parse_time
from vlmguard.vlm import SEVERITIES, token_report

CONFIG_HELP = "Config file (default ./config.toml, or $VLMGUARD_CONFIG)."


def config_option(command):
    return click.option("--config", "config_path", envvar="VLMGUARD_CONFIG",
                        default="config.toml", show_default=True, metavar="PATH",
                        # Checked by load_config, whose errors are one line (click's are four).
                        type=click.Path(), help=CONFIG_HELP)(command)


def reports_errors(command):
    """Turn VlmguardError into `vlmguard: <message>` and its exit code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VlmguardError as exc:
            click.echo(redact_text(f"vlmguard: {exc}"), err=True)
            sys.exit(exc.exit_code)
    return wrapper


def echo(text: str) -> None:
    """Command output: whatever URL it quotes (a database's, a provider's in an error)
    masked by the same redaction as the logs."""
    click.echo(redact_text(text))


# Files the daemon and its FFmpegs create are for this user alone, as under the unit's
# UMask=0077: archives, snapshots, the database, the run state.
PRIVATE_UMASK = 0o077


def make_files_private() -> None:
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


def open_store(config):
    return Store.from_config(config, create=False)


def find_job(store, job_id: int):
    # A larger number is no job, not an overflow inside the driver.
    found = store.reports.get(job_id) if 0 < job_id <= MAX_ID else None
    if found is None:
        raise VlmguardError(f"no job {job_id}")
    return found


def own_daemon_listens(config) -> bool:
    """Whether this data dir's running daemon already listens on the configured port."""
    if daemon_pid(config.data_dir) is None:
        return False
    listen = read_states(config.data_dir).get("supervisor", {}).get("listen", {})
    return listen.get("port") == config.server.port


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmguard")
def main():
    """vlmguard: live HLS, 10-minute archives and vision-model safety analysis for IP cameras.

    One `vlmguard run` supervises a streaming process, an archiver and a pool of
    analysis processes that share a job table (SQLite WAL by default, or PostgreSQL).
    The other commands read and steer that table; they work whether or not the
    daemon is running.
    """


@main.command()
@config_option
@reports_errors
def run(config_path):
    """Run the daemon: the streamer, the archiver and the analysis pool, supervised.

    Stops in order on SIGTERM or SIGINT (a second SIGINT stops at once); SIGHUP reloads the
    config. Logs go to stdout: JSON lines when it is not a terminal (journald).
    """
    from vlmguard.supervisor import Supervisor  # only `run` needs the daemon's machinery

    config = load_config(config_path)
    make_files_private()
    # Made 0700 (or refused when someone else made it) before any child writes into it.
    Layout(config.data_dir).claim_ram()
    configure_logging("supervisor")
    sys.exit(Supervisor(config).run())


@main.command("check-config")
@config_option
@reports_errors
def check_config(config_path):
    """Validate the config file and print the effective settings (secrets masked).

    Applies the rules `run` applies at start too: a token when the server is reachable
    off this machine, and a free port (or one this data dir's running daemon holds).
    Exit status 0 when the file is valid, 2 with one line naming the key when not.
    """
    config = load_config(config_path)
    check_server_settings(config)
    check_listen_address(config, held_by_us=own_daemon_listens(config))
    problem = Layout(config.data_dir).ram_problem()
    if problem:
        raise StartupError(problem)
    click.echo(json.dumps(masked(config), indent=2))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object with stable keys.")
@reports_errors
def status(config_path, as_json):
    """Daemon, cameras, archives, jobs, analyzers, failures and tokens, on one screen.

    Works with the daemon stopped (from the database and files) and says so. Exit status
    0 when healthy, 1 when something needs attention (the daemon down, a camera offline,
    recent failures, no API key), for scripts and monitoring checks.
    """
    config = load_config(config_path)
    report = gather_status(config)
    echo(json.dumps(report, indent=2) if as_json else render_status(report))
    sys.exit(0 if report["healthy"] else 1)


@main.command()
@config_option
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only jobs in this state (repeatable).")
@click.option("--camera", "camera_id", metavar="ID", help="Only this camera's jobs.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one job a line.")
@reports_errors
def jobs(config_path, states, camera_id, limit, as_json):
    """List analysis jobs, newest first."""
    config = load_config(config_path)
    with open_store(config) as store:
        found = store.reports.list_jobs(states=states, camera_id=camera_id, limit=limit)
    for job in found:
        if as_json:
            echo(json.dumps(job_summary(job)))
        else:
            score = "-" if job.safety_score is None else job.safety_score
            echo(f"{job.id:>6}  {job.camera_id:<16} {job.segment_start:%Y-%m-%d %H:%M:%S}  "
                 f"{job.status:<10} score {score:<3} retries {job.retry_count}/{job.max_retries}"
                 + (f"  {job.error_message}" if job.error_message else ""))


@main.command()
@config_option
@click.argument("job_id", type=int)
@reports_errors
def retry(config_path, job_id):
    """Send a failed job round again, with a fresh retry budget."""
    config = load_config(config_path)
    with open_store(config) as store:
        job = find_job(store, job_id)
        if not store.queue.retry(job_id):
            raise VlmguardError(f"job {job_id} is {job.status}, only failed jobs can be retried")
    click.echo(f"job {job_id} is pending again")


@main.group()
def job():
    """One job."""


@job.command("show")
@config_option
@click.argument("job_id", type=int)
@reports_errors
def job_show(config_path, job_id):
    """Everything about one job, its result and incidents included, as JSON."""
    config = load_config(config_path)
    with open_store(config) as store:
        found = find_job(store, job_id)
        detail = job_detail(found, store.incidents.list_incidents(job_id))
    echo(json.dumps(detail, indent=2))


@main.command()
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--camera", "camera_id", metavar="ID", help="Use this camera's prompt context.")
@click.option("--json", "as_json", is_flag=True, help="The checked answer and tokens as JSON.")
@reports_errors
def analyze(config_path, file, camera_id, as_json):
    """Analyse one video file now and print the result; nothing is stored.

    For tuning prompts and settings: the file goes through the same preparation, prompt,
    model call and checks as an archive in the job table.
    """
    from vlmguard.analyzer import analyze_file

    config = load_config(config_path)
    finding, answer = analyze_file(config, file, camera_id)
    tokens = token_report(answer)
    if as_json:
        click.echo(json.dumps({"safety_score": finding.safety_score, "summary": finding.summary,
                               "incidents": list(finding.incidents), "tokens": tokens,
                               "model_version": answer.model_version}, indent=2))
        return
    click.echo(f"safety score {finding.safety_score}/100   tokens {tokens['total']}")
    click.echo(finding.summary)
    for incident in finding.incidents:
        click.echo(f"  {incident['start_offset_s']:7.1f}-{incident['end_offset_s']:<7.1f} "
                   f"{incident['severity']:<8} {incident['category']:<12} {incident['description']}")


@main.command()
@config_option
@click.option("--camera", "camera_id", metavar="ID", help="Only this camera's incidents.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]),
              help="Only incidents starting at or after this time (UTC).")
@click.option("--severity", type=click.Choice(SEVERITIES),
              help="Only incidents of this severity or worse.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one incident a line.")
@reports_errors
def incidents(config_path, camera_id, since, severity, limit, as_json):
    """Incidents the analysis found, newest first, with wall-clock times (UTC)."""
    config = load_config(config_path)
    worse = SEVERITIES[SEVERITIES.index(severity):] if severity else ()
    with open_store(config) as store:
        rows = store.incidents.find_incidents(camera_id=camera_id, severities=worse, limit=limit,
                                              since=since.replace(tzinfo=timezone.utc) if since else None)
    for row in rows:
        if as_json:
            click.echo(json.dumps({k: iso(v) if isinstance(v, datetime) else v
                                   for k, v in row.items()}))
        else:
            click.echo(f"{row['start_at']:%Y-%m-%d %H:%M:%S}  {row['camera_id']:<16} "
                       f"{row['severity']:<8} {row['category']:<12} {row['description']}"
                       f"  (job {row['job_id']})")


@main.group()
def alerts():
    """Alert destinations (MQTT, webhooks, Apprise URLs)."""


@alerts.command("test")
@config_option
@click.option("--rule", metavar="NAME", help="Only this rule's destinations (MQTT is not a rule's).")
@reports_errors
def alerts_test(config_path, rule):
    """Send a test message to every destination now and print what each answered.

    Exit status 0 when every destination took it, 1 when one did not.
    """
    import asyncio

    from vlmguard.notifier import send_tests

    config = load_config(config_path)
    # Each destination's answer is printed below; the plug-ins' own log lines would only
    # repeat it in between.
    configure_logging("cli", level="CRITICAL")
    if rule is not None and rule not in [r.name for r in config.alerts.rules]:
        raise VlmguardError(f"no rule {rule!r} (configured: "
                            f"{', '.join(r.name for r in config.alerts.rules) or 'none'})")
    results = asyncio.run(send_tests(config, rule))
    if not results:
        raise VlmguardError("no alert destinations configured ([mqtt] host or [[alerts.rules]])")
    for name, label, answer in results:
        verdict = "ok" if answer.delivered else answer.outcome.upper()
        click.echo(f"{name:<28} {label:<40} {verdict}  {answer.detail}")
    sys.exit(0 if all(answer.delivered for _, _, answer in results) else 1)


@main.command("export")
@config_option
@click.option("--camera", "camera_id", required=True, metavar="ID", help="The camera's id.")
@click.option("--start", required=True, metavar="TIME",
              help="ISO 8601, UTC unless it names a zone (2026-11-26T08:00:00Z).")
@click.option("--duration", required=True, metavar="SECONDS", help="At most 3600.")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="The MP4 to write; '-' writes a fragmented MP4 to standard output.")
@reports_errors
def export(config_path, camera_id, start, duration, output):
    """Write a camera's recorded video from TIME for SECONDS to one MP4 (stream copy, no
    re-encoding); gaps in the footage are left out. Works with the daemon running or not;
    the archives read are kept from retention until it is done.
    """
    from vlmguard.ffmpeg import ffmpeg_binary
    from vlmguard.layout import Layout
    from vlmguard.recordings import MAX_EXPORT_SECONDS, export_file

    config = load_config(config_path)
    if config.camera(camera_id) is None:
        raise VlmguardError(f"--camera: no camera {camera_id!r} in {config.source}")
    when = option_time(start, "--start")
    try:
        seconds = float(duration)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_EXPORT_SECONDS:
        raise VlmguardError(f"--duration: must be seconds, more than 0 and at most "
                            f"{MAX_EXPORT_SECONDS}, got {duration!r}")
    configure_logging("cli", level="CRITICAL" if output == "-" else "WARNING")
    plan = export_file(Layout(config.data_dir), ffmpeg_binary(), camera_id, when, seconds, output)
    click.echo(f"{camera_id}: {iso(plan.start)} to {iso(plan.end)} ({plan.seconds:.1f} s, "
               f"{len(plan.files)} archive files) -> {output}", err=True)


def option_time(raw: str, option: str) -> datetime:
    try:
        return parse_time(raw.strip())
    except ValueError as exc:
        raise VlmguardError(f"{option}: {exc}, got {raw!r}") from None


if __name__ == "__main__":
    main()
