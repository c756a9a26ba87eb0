"""config.toml, parsed once into frozen dataclasses.

Every field's type, default and allowed range is declared on the dataclass itself
(``field(metadata=...)``); one small walker checks a TOML table against it, so adding a
key is one line and every error names the file and the key path in one line.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import socket
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmguard.errors import ConfigError
from vlmguard.options import opt
from vlmguard.redact import mask_path, mask_url  # noqa: F401  (one redaction, re-exported)
from vlmguard.vlm import CATEGORIES, registry

CAMERA_ID = re.compile(r"[a-z0-9_-]{1,50}")
CAMERA_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "file:///", "lavfi:")
# Characters FFmpeg cannot take in data_dir: the tee muxer splits outputs on | and reads
# [options] with \ and ' as escapes, an option value ends at : or ], and the HLS and
# segment muxers read % as a pattern. Escaping would take two nested levels (the tee's
# output split, then its option parser) that differ per position; refusing is certain.
FFMPEG_PATH_CHARS = "|[]\\':%"
MIN_WINDOW_SECONDS = 10
# A token a network can reach is guessed at the sign-in's limited rate: 16 characters
# from secrets.token_urlsafe hold 96 bits.
MIN_NETWORK_TOKEN = 16
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
ORIGIN = re.compile(r"https?://[^/?#@\s]+")
# A node name: a host name's first label, or any such short name (it goes into URLs,
# logs and a VARCHAR(64) column).
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = opt("127.0.0.1")
    port: int = opt(8080, lo=1, hi=65535)
    token: str = opt("", secret=True)
    max_connections: int = opt(256, lo=8, hi=100000)
    header_timeout_seconds: float = opt(10.0, lo=1, hi=300)
    idle_timeout_seconds: float = opt(30.0, lo=1, hi=3600)
    # How people and systems outside reach this server (alert links); empty: http://host:port.
    public_url: str = opt("")
    # The console's sign-in lasts this long (a signed session cookie), then asks again.
    session_hours: float = opt(12.0, lo=0.01, hi=720)
    # Console live-update streams (/api/events) held at once; each holds a connection.
    # Not set: 16, or half of max_connections when that is less (players keep the rest).
    max_event_streams: int = opt(16, lo=1, hi=1000)
    # Without a token (loopback only), the Host header must name this server: loopback,
    # server.host, public_url's host, or one of these (DNS rebinding).
    allowed_hosts: tuple[str, ...] = opt(())
    # Without a token, the web pages of these origins may read the API and the video
    # (CORS); with a token, any origin may (it needs the token).
    cors_origins: tuple[str, ...] = opt(())

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = opt("./data")
    segment_seconds: int = opt(2, lo=1, hi=30)
    live_segments: int = opt(6, lo=3, hi=60)
    archive_seconds: int = opt(600, lo=10, hi=3600)
    # 100 years: far enough, and now - retention stays a valid date (1,000,000 days would not).
    retention_days: float = opt(7.0, lo=0, hi=36500)
    max_disk_gb: float = opt(0.0, lo=0, hi=1_000_000)
    min_free_gb: float = opt(1.0, lo=0, hi=100_000)
    # What the analysis windows may hold in RAM; past it the oldest waiting windows are
    # dropped from RAM and analysed from their archive instead.
    ram_max_mb: int = opt(256, lo=16, hi=65536)
    # Low-latency HLS: the length aimed at for a partial segment (a whole number of frames).
    part_seconds: float = opt(0.25, lo=0.1, hi=1.0)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = opt("", secret=True)
    sqlite_synchronous: str = opt("normal", choices=("normal", "full"))


@dataclass(frozen=True)
class AnalysisConfig:
    workers: int = opt(2, lo=0, hi=64)
    max_retries: int = opt(3, lo=0, hi=100)
    lease_seconds: int = opt(60, lo=5, hi=3600)
    retry_backoff_seconds: float = opt(10.0, lo=0.1, hi=3600)
    poll_seconds: float = opt(5.0, lo=0.05, hi=300)
    mode: str = opt("reduced", choices=("reduced", "original"))
    fps: float = opt(0.5, lo=0.05, hi=5)
    height: int = opt(360, lo=144, hi=2160)
    # The providers to try, in order (names of [providers.NAME] tables); empty: every
    # configured provider in the order the file declares them.
    providers: tuple[str, ...] = opt(())
    # A clip in which no frame differs from the first is not sent, except once this often
    # per camera (a covered or frozen camera must still be seen). 0: send every clip.
    static_check_minutes: float = opt(30.0, lo=0, hi=1440)
    # Grey levels (mean over an 8x8 block) that count as a change between keyframes.
    change_threshold: int = opt(24, lo=1, hi=255)
    # Clock-aligned analysis windows (10-600 s); 0 = one job per archive file.
    window_seconds: int = opt(60, lo=0, hi=600)
    # Past this lag a camera's waiting windows are merged into longer jobs.
    max_lag_seconds: float = opt(600.0, lo=30, hi=86400)
    # For the console's cost estimate only: what a million tokens cost (any currency).
    price_per_million_tokens: float = opt(0.0, lo=0, hi=100000)


@dataclass(frozen=True)
class DaemonConfig:
    hang_seconds: float = opt(60.0, lo=5, hi=3600)
    stop_timeout_seconds: float = opt(30.0, lo=1, hi=600)
    max_restarts: int = opt(5, lo=1, hi=1000)
    restart_window_seconds: float = opt(120.0, lo=10, hi=86400)
    # A role other than the streamer that crash-loops is backed off, not fatal: it is
    # retried with a growing wait, at most this long.
    max_backoff_seconds: float = opt(300.0, lo=5, hi=3600)
    # This box's name among the boxes that share one database (its `nodes` row, the node
    # its jobs are recorded on); empty: the host name.
    node: str = opt("")


@dataclass(frozen=True)
class MqttConfig:
    host: str = opt("")  # empty: MQTT off
    port: int = opt(1883, lo=1, hi=65535)
    username: str = opt("")
    password_file: str = opt("")
    tls: bool = opt(False)
    topic_prefix: str = opt("vlmguard")
    discovery_prefix: str = opt("homeassistant")  # empty: no Home Assistant discovery
    keepalive_seconds: int = opt(30, lo=5, hi=3600)

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class AlertRule:
    name: str = opt()
    min_severity: str = opt("high", choices=("low", "medium", "high", "critical"))
    categories: tuple[str, ...] = opt(())  # empty: every category
    cameras: tuple[str, ...] = opt(())  # empty: every camera
    cooldown_seconds: float = opt(300.0, lo=0, hi=86400)
    urls: tuple[str, ...] = opt((), secret=True)  # Apprise URLs
    webhooks: tuple[str, ...] = opt((), secret=True)
    webhook_secret: str = opt("", secret=True)
    webhook_secret_file: str = opt("")


@dataclass(frozen=True)
class AlertsConfig:
    # A delivery still failing this long after its incident is given up (failed, counted).
    max_age_hours: float = opt(24.0, lo=0.01, hi=720)
    rules: tuple[AlertRule, ...] = field(default=(), metadata={"internal": True})

    @property
    def enabled(self) -> bool:
        return bool(self.rules)


@dataclass(frozen=True)
class CameraConfig:
    id: str = opt()
    url: str = opt(secret=True)
    prompt: str = opt("")
    transcode: str = opt("auto", choices=("auto", "always", "never"))
    # Low-latency HLS (fMP4 segments with parts) on the live URL; false: MPEG-TS segments.
    low_latency: bool = opt(True)
    providers: tuple[str, ...] = opt(())  # empty: analysis.providers


@dataclass(frozen=True)
class Config:
    source: Path
    server: ServerConfig
    storage: StorageConfig
    database: DatabaseConfig
    analysis: AnalysisConfig
    daemon: DaemonConfig
    cameras: tuple[CameraConfig, ...]
    # Every configured provider (vlmguard.vlm.ProviderSettings of its kind), by name.
    providers: tuple[Any, ...] = ()
    mqtt: MqttConfig = MqttConfig()
    alerts: AlertsConfig = AlertsConfig()

    @property
    def public_url(self) -> str:
        """The base of links in alerts, without a trailing slash."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server.port}"

    @property
    def data_dir(self) -> Path:
        """Relative paths hang off $STATE_DIRECTORY under systemd, else off the config's folder."""
        path = Path(self.storage.data_dir).expanduser()
        if path.is_absolute():
            return path
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        base = Path(state) if state else self.source.resolve().parent
        return (base / path).resolve()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'vlmguard.db'}"

    @property
    def node_name(self) -> str:
        """This box's name among the boxes sharing the database."""
        return self.daemon.node or default_node_name()

    @property
    def node_role(self) -> str:
        """What this box does for the site: records (cameras), analyses (workers), or both."""
        records, analyses = bool(self.cameras), self.analysis.workers > 0
        if records and analyses:
            return "both"
        return "records" if records else ("analyses" if analyses else "serves")

    def camera(self, camera_id: str) -> CameraConfig | None:
        return next((c for c in self.cameras if c.id == camera_id), None)

    def provider(self, name: str) -> Any:
        return next((p for p in self.providers if p.name == name), None)

    def provider_order(self, camera_id: str | None = None) -> tuple[Any, ...]:
        """The providers a camera's clips go to, first choice first."""
        camera = self.camera(camera_id) if camera_id else None
        names = (camera.providers if camera and camera.providers else self.analysis.providers)
        return tuple(self.provider(n) for n in names) if names else self.providers


SECTIONS = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "database": DatabaseConfig,
    "analysis": AnalysisConfig,
    "daemon": DaemonConfig,
    "mqtt": MqttConfig,
}


def check_server_settings(config: Config) -> None:
    """Run-time rule: a server reachable from the network must ask for a token that
    cannot be guessed."""
    server = config.server
    if server.is_loopback:
        return
    if not server.token:
        raise ConfigError(f"{config.source}: server.token: required when server.host "
                          f"({server.host}) is not a loopback address")
    if len(server.token) < MIN_NETWORK_TOKEN:
        raise ConfigError(f"{config.source}: server.token: must be at least "
                          f"{MIN_NETWORK_TOKEN} characters when server.host ({server.host}) "
                          f"is not a loopback address, got {len(server.token)} (make one: "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe(24))')")


def parse_server(table: dict[str, Any], where: str) -> ServerConfig:
    """[server], and the combinations that would lock players out refused."""
    server = build(ServerConfig, table, "server", where)
    if "max_event_streams" not in table:
        server = dataclasses.replace(
            server, max_event_streams=min(server.max_event_streams, server.max_connections // 2))
    if server.max_event_streams > server.max_connections // 2:
        raise ConfigError(f"{where}: server.max_event_streams: must be at most half of "
                          f"server.max_connections ({server.max_connections}) so players keep "
                          f"connections, got {server.max_event_streams}")
    if not server.token.isprintable():
        # Headers and the sign-in form cannot carry a tab or a line break.
        raise ConfigError(f"{where}: server.token: must not contain control characters")
    if server.public_url and not ORIGIN.match(server.public_url):
        raise ConfigError(f"{where}: server.public_url: must be an http:// or https:// URL "
                          f"with a host, got {server.public_url!r}")
    for n, name in enumerate(server.allowed_hosts):
        if not (HOST_NAME.fullmatch(name) or is_ip(name.strip("[]"))):
            raise ConfigError(f"{where}: server.allowed_hosts[{n}]: must be a host name or "
                              f"an IP address (no scheme, no port), got {name!r}")
    for n, origin in enumerate(server.cors_origins):
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(f"{where}: server.cors_origins[{n}]: must be an origin such as "
                              f"https://dashboard.example:8443 (no path, no *), got {origin!r}")
    return server


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port right now, or None when it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"{host}:{port} is already in use"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def check_listen_address(config: Config, held_by_us: bool = False) -> None:
    """Run-time rule: the server's port must be free (held_by_us: this data dir's own
    running daemon listens there, which a restart or reload takes over)."""
    problem = port_problem(config.server.host, config.server.port)
    if problem and not (held_by_us and problem.endswith("in use")):
        raise ConfigError(f"{config.source}: server.port: {problem}")


def load_config(path: str | os.PathLike) -> Config:
    """Read and check a config file; any problem raises ConfigError with one line."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    where = str(path)
    unknown = sorted(set(raw) - set(SECTIONS) - {"cameras", "providers", "alerts"}
                     - set(registry.legacy_sections()))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key")
    legacy = registry.legacy_tables(raw, where)
    if legacy is not None:
        providers = parse_providers(legacy, where, prefix="")
        raw = dict(raw, analysis={k: v for k, v in section(raw, "analysis", where).items()
                                  if k not in registry.LEGACY_ANALYSIS_KEYS})
    else:
        for name in registry.legacy_sections():
            if name in raw:
                raise ConfigError(f"{where}: {name}: cannot be used together with [providers]; "
                                  f"move its keys to a [providers.NAME] table")
        providers = parse_providers(section(raw, "providers", where), where, prefix="providers.")
    sections = {name: parse_server(section(raw, name, where), where) if name == "server"
                else build(cls, section(raw, name, where), name, where)
                for name, cls in SECTIONS.items()}
    cameras = parse_cameras(raw.get("cameras", []), where)
    alerts = parse_alerts(section(raw, "alerts", where), where, cameras)
    config = Config(source=path, cameras=cameras, providers=providers, alerts=alerts, **sections)
    check_provider_names(config, where)
    check_mqtt(config.mqtt, where)
    check_database_url(config.database.url, where)
    check_data_dir(config, where)
    check_window(config, where)
    check_node(config, where)
    return config


def default_node_name() -> str:
    """The host name's first label, made a valid node name (a host name may be long or
    hold characters a node name cannot)."""
    label = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", label)[:63].strip("-.") or "vlmguard"
    return cleaned if NODE_NAME.fullmatch(cleaned) else "vlmguard"


def check_node(config: Config, where: str) -> None:
    node = config.daemon.node
    if node and not NODE_NAME.fullmatch(node):
        raise ConfigError(f"{where}: daemon.node: must be 1-63 letters, digits, '.', '_' or "
                          f"'-', starting with a letter or digit, got {node!r}")


def check_window(config: Config, where: str) -> None:
    seconds = config.analysis.window_seconds
    if 0 < seconds < MIN_WINDOW_SECONDS:
        raise ConfigError(f"{where}: analysis.window_seconds: must be 0 or "
                          f">= {MIN_WINDOW_SECONDS}, got {seconds}")


def check_data_dir(config: Config, where: str) -> None:
    """The resolved path (a relative one hangs off the config's folder) goes into FFmpeg's
    output specs, so it must hold none of the characters those specs give a meaning."""
    try:
        path = str(config.data_dir)
    except RuntimeError:  # "~name" for a user this system does not have
        raise ConfigError(f"{where}: storage.data_dir: {config.storage.data_dir!r}: no such "
                          "home directory") from None
    bad = sorted({c for c in path if c in FFMPEG_PATH_CHARS or not c.isprintable()})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ConfigError(f"{where}: storage.data_dir: {path!r} holds characters FFmpeg's "
                          f"output specs cannot take: {shown}")


def parse_providers(tables: dict[str, Any], where: str, prefix: str) -> tuple[Any, ...]:
    """[providers.NAME] tables, each checked against its kind's settings dataclass."""
    providers = []
    for name, table in tables.items():
        key = f"{prefix}{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {key}: must be a table")
        if not CAMERA_ID.fullmatch(name):
            raise ConfigError(f"{where}: {key}: provider names must match [a-z0-9_-]{{1,50}}")
        kinds = sorted(registry.kinds())
        kind = table.get("kind")
        if kind is None:
            raise ConfigError(f"{where}: {key}.kind: required (one of {', '.join(kinds)})")
        cls = registry.settings_class(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ConfigError(f"{where}: {key}.kind: must be one of {', '.join(kinds)}, "
                              f"got {kind!r}")
        providers.append(dataclasses.replace(build(cls, table, key, where), name=name))
    if not providers:
        raise ConfigError(f"{where}: providers: at least one [providers.NAME] table is needed")
    return tuple(providers)


def check_provider_names(config: Config, where: str) -> None:
    known = [p.name for p in config.providers]
    lists = [("analysis.providers", config.analysis.providers)]
    lists += [(f"cameras[{i}].providers", c.providers) for i, c in enumerate(config.cameras)]
    for key, names in lists:
        for name in names:
            if name not in known:
                raise ConfigError(f"{where}: {key}: no provider {name!r} (configured: "
                                  f"{', '.join(known)})")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: {key}: a provider is listed twice")


def section(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name}: must be a table")
    return value


def parse_cameras(raw: Any, where: str) -> tuple[CameraConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: cameras: must be an array of tables ([[cameras]])")
    cameras = []
    for index, table in enumerate(raw):
        key = f"cameras[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {key}: must be a table")
        camera = build(CameraConfig, table, key, where)
        if not CAMERA_ID.fullmatch(camera.id):
            raise ConfigError(f"{where}: {key}.id: must match [a-z0-9_-]{{1,50}}, got {camera.id!r}")
        if not camera.url.startswith(CAMERA_SCHEMES):
            raise ConfigError(f"{where}: {key}.url: scheme must be one of "
                              f"{', '.join(CAMERA_SCHEMES)}")
        if not camera.url.isprintable():
            # It becomes an FFmpeg argument and log text: no line breaks or control bytes.
            raise ConfigError(f"{where}: {key}.url: must not contain control characters")
        if any(c.id == camera.id for c in cameras):
            raise ConfigError(f"{where}: {key}.id: duplicate camera id {camera.id!r}")
        cameras.append(camera)
    return tuple(cameras)


def check_mqtt(mqtt: MqttConfig, where: str) -> None:
    """Topic prefixes become topic levels: MQTT's wildcards and empty levels are refused."""
    for key in ("topic_prefix", "discovery_prefix"):
        value = getattr(mqtt, key)
        if (key == "topic_prefix" and not value) or any(c in value for c in "+#") \
                or value.startswith("/") or value.endswith("/") or "//" in value \
                or not value.isprintable():
            raise ConfigError(f"{where}: mqtt.{key}: must be a topic without + # or empty "
                              f"levels, got {value!r}")


def parse_alerts(table: dict[str, Any], where: str,
                 cameras: tuple[CameraConfig, ...]) -> AlertsConfig:
    """[alerts] (max_age_hours) and its [[alerts.rules]]."""
    settings = build(AlertsConfig, {k: v for k, v in table.items() if k != "rules"}, "alerts", where)
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}: alerts.rules: must be an array of tables ([[alerts.rules]])")
    rules: list[AlertRule] = []
    known_cameras = {c.id for c in cameras}
    for index, item in enumerate(raw_rules):
        key = f"alerts.rules[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: {key}: must be a table")
        rule = build(AlertRule, item, key, where)
        if not CAMERA_ID.fullmatch(rule.name):
            raise ConfigError(f"{where}: {key}.name: must match [a-z0-9_-]{{1,50}}, got {rule.name!r}")
        if any(r.name == rule.name for r in rules):
            raise ConfigError(f"{where}: {key}.name: duplicate rule name {rule.name!r}")
        for n, category in enumerate(rule.categories):
            if category not in CATEGORIES:
                raise ConfigError(f"{where}: {key}.categories[{n}]: must be one of "
                                  f"{', '.join(CATEGORIES)}, got {category!r}")
        for n, camera in enumerate(rule.cameras):
            if camera not in known_cameras:
                raise ConfigError(f"{where}: {key}.cameras[{n}]: no camera {camera!r}")
        for n, url in enumerate(rule.webhooks):
            if not url.startswith(("http://", "https://")) or not url.isprintable():
                raise ConfigError(f"{where}: {key}.webhooks[{n}]: must be an http:// or "
                                  "https:// URL")
        for n, url in enumerate(rule.urls):
            if "://" not in url or not url.isprintable():
                raise ConfigError(f"{where}: {key}.urls[{n}]: must be an Apprise URL "
                                  "(scheme://...)")
        if rule.webhook_secret and rule.webhook_secret_file:
            raise ConfigError(f"{where}: {key}.webhook_secret_file: set webhook_secret or "
                              "webhook_secret_file, not both")
        if not rule.urls and not rule.webhooks:
            raise ConfigError(f"{where}: {key}: needs urls or webhooks (a destination)")
        rules.append(rule)
    return dataclasses.replace(settings, rules=tuple(rules))


def check_database_url(url: str, where: str) -> None:
    if url and not url.startswith(("sqlite:///", "postgresql")):
        raise ConfigError(f"{where}: database.url: must start with sqlite:/// or postgresql+psycopg://")


def build(cls: type, table: dict[str, Any], prefix: str, where: str) -> Any:
    """Check one table against a dataclass's declared fields and build it."""
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}: {prefix}.{key}: unknown key")
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}.{name}"
        if name not in table:
            if spec.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: {key}: required")
            continue
        values[name] = check_value(table[name], spec, f"{where}: {key}")
    return cls(**values)


def check_value(value: Any, spec: dataclasses.Field, label: str) -> Any:
    if spec.type in LIST_TYPES:
        return check_list(value, spec, label)
    accepted, noun = TYPES[spec.type]
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: must be {noun}, got {toml_type(value)}")
        return value
    # TOML booleans are ints to Python; a bool is never a number in this file.
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(f"{label}: must be {noun}, got {toml_type(value)}")
    if isinstance(value, str) and "\0" in value:
        # TOML allows \u0000; no path, URL, name or environment variable can hold it.
        raise ConfigError(f"{label}: must not contain a NUL character")
    if isinstance(value, float) and not math.isfinite(value):
        # TOML has nan and inf literals, and NaN compares false with every bound.
        raise ConfigError(f"{label}: must be a finite number, got {value}")
    meta = spec.metadata
    if meta["lo"] is not None and value < meta["lo"]:
        raise ConfigError(f"{label}: must be >= {meta['lo']}, got {value}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise ConfigError(f"{label}: must be <= {meta['hi']}, got {value}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{label}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    return float(value) if spec.type == "float" else value


def check_list(value: Any, spec: dataclasses.Field, label: str) -> tuple[Any, ...]:
    """An array whose every element is checked like a scalar key of the item type."""
    if not isinstance(value, list):
        raise ConfigError(f"{label}: must be {LIST_TYPES[spec.type][1]}, got {toml_type(value)}")
    item = dataclasses.field(metadata=spec.metadata)
    item.type = LIST_TYPES[spec.type][0]
    return tuple(check_value(element, item, f"{label}[{n}]") for n, element in enumerate(value))


TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
         "bool": (bool, "a boolean (true or false)")}
# Array keys: the element type, checked as above, and the noun for the whole.
LIST_TYPES = {"tuple[str, ...]": ("str", "an array of strings")}


def toml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


def masked(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets replaced, for check-config."""
    def table(obj: Any) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("internal"):
                continue
            value = list(value) if isinstance(value, tuple) else value
            out[f.name] = mask(value) if f.metadata.get("secret") and value else value
        return out

    data = {name: table(getattr(config, name)) for name in SECTIONS}
    data["analysis"]["providers"] = [p.name for p in config.provider_order()]
    data["providers"] = {p.name: registry.plain(p) for p in config.providers}
    for out in data["providers"].values():
        out["base_url"] = mask_url(out["base_url"]) if out["base_url"] else ""
    data["storage"]["data_dir"] = str(config.data_dir)
    data["database"]["url"] = mask_url(config.database_url)
    data["alerts"] = {"max_age_hours": config.alerts.max_age_hours,
                      "rules": [table(r) for r in config.alerts.rules]}
    for rule, out in zip(config.alerts.rules, data["alerts"]["rules"]):
        # Apprise URLs carry their tokens in the path (tgram://TOKEN/CHAT): only the scheme shows.
        out["urls"] = [url.partition("://")[0] + "://***" for url in rule.urls]
        out["webhooks"] = [mask_path(url) for url in rule.webhooks]
    data["cameras"] = [table(c) for c in config.cameras]
    for camera, out in zip(config.cameras, data["cameras"]):
        out["url"] = mask_url(camera.url)
    return data


def mask(_value: str) -> str:
    return "***"


