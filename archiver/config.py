"""TOML → frozen, validated Settings.

Where the config comes from, first found wins: ``--config PATH``, ``$ARCHIVER_CONFIG``,
``./archiver.toml``; with none of them the embedded defaults apply (local disk + SQLite in the
current directory). Relative paths in a config file are relative to that file's directory.

Every problem is reported at once, each naming its key (``ConfigError``). Secrets never live in
the file: the Telnyx key comes from the environment variable named by ``telnyx.api_key_env``,
from ``telnyx.api_key_file``, or from a systemd credential named ``telnyx_api_key``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from archiver.errors import ConfigError
from archiver.sources import COMPOSITIONS, RECORDINGS, SOURCES
from archiver.storage import registry as storage_registry

CONFIG_ENV = "ARCHIVER_CONFIG"
DEFAULT_CONFIG_NAME = "archiver.toml"
CREDENTIAL_NAME = "telnyx_api_key"


class Secret:
    """A value that never shows itself in a repr, a log line or an error."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class TelnyxSettings:
    base_url: str = "https://api.telnyx.com/v2"
    api_key_env: str = "TELNYX_API_KEY"
    api_key_file: Path | None = None
    page_size: int = 250
    timeout: float = 30.0
    # Retries of one API call: attempts and total time, whichever is reached first.
    max_attempts: int = 8
    max_retry_seconds: float = 300.0
    # Cap on one backoff sleep, also applied to server-sent Retry-After / x-ratelimit-reset.
    max_backoff: float = 60.0
    # Let download URLs lead to loopback, private, CGNAT or link-local hosts (never to a cloud
    # metadata address, nor to the API's own origin). Off: only when the API itself is on
    # such an address, and then only to that class (archiver.netguard).
    allow_private_download_hosts: bool = False
    api_key: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class FilterSettings:
    """Standing filters applied to every listing (each maps to one API filter)."""

    room_id: str | None = None
    session_id: str | None = None
    participant_id: str | None = None
    type: str | None = None
    duration_secs_gte: int | None = None
    duration_secs_lte: int | None = None


@dataclass(frozen=True, slots=True)
class S3Settings:
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    storage_class: str | None = None
    sse: str | None = None
    kms_key_id: str | None = None
    object_lock_mode: str | None = None
    retention_days: int | None = None
    legal_hold: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)
    # An upload above the threshold holds two parts of part_size: one filling, one going up.
    multipart_threshold: int = 8 * 1024 * 1024
    part_size: int = 8 * 1024 * 1024
    max_threads: int = 8


@dataclass(frozen=True, slots=True)
class StorageSettings:
    backend: str = "local"
    path: Path = Path("archive")
    key_template: str = "{ended:%Y/%m/%d}/{room_id}/{id}.{ext}"
    sidecar: bool = True
    s3: S3Settings | None = None
    # The archive root and the ledger's directory are created when missing, but not their
    # parents (a typo, or a disk not mounted, would fill the root disk): unless this is true.
    create_parents: bool = False


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    path: Path = Path("archiver.db")
    # postgresql://user@host:port/db: the password comes from PGPASSWORD or password_file.
    url: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    concurrency: int = 8
    # Failures of one recording (across passes and runs) before it is failed for good and
    # needs an operator (``archiver retry``). Claims cut short by our own process stopping use
    # none; more than ``max_interruptions`` of those fail it for good too.
    max_attempts: int = 5
    max_interruptions: int = 20
    # Resumes within one claim (truncated bodies, expired URLs) before the claim fails.
    transfer_attempts: int = 6
    lease_seconds: float = 30.0
    # A listed download URL older than this is refreshed before use.
    url_max_age: float = 300.0
    chunk_size: int = 1024 * 1024
    # Seconds without a byte before a download is considered stalled.
    read_timeout: float = 60.0
    # Bytes/s a download must average once ``read_timeout`` has passed (0: no floor): with the
    # size the API announces, this bounds how long one transfer may take.
    min_throughput: int = 32 * 1024
    connect_timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    # Listing passes after the first, to catch what page shifts hid and what finished processing.
    max_passes: int = 4
    # Seconds to wait before another pass when only still-processing recordings are left.
    processing_wait: float = 20.0


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    # What the first pass on a ledger without a high-water mark lists: "all" (the whole
    # history) or a number of days back.
    first_start: str | int = "all"
    poll_interval: float = 300.0
    rescan_days: int = 7
    rescan_interval: float = 6 * 3600.0
    overlap_days: int = 1
    shutdown_grace: float = 30.0
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    webhook_port: int = 0
    webhook_host: str = "127.0.0.1"
    webhook_public_key: str | None = None
    webhook_tolerance: float = 300.0


@dataclass(frozen=True, slots=True)
class SourceSettings:
    delete_after_archive: bool = False
    # Before a deletion at the source, the copy must also parse as media (ffprobe) and last as
    # long as the API's duration_secs (within 2 s).
    media_check: bool = False


@dataclass(frozen=True, slots=True)
class SourcesSettings:
    """Which of the API's collections are archived (``archiver.sources``)."""

    room_recordings: bool = True
    # The mixed mp4 of a room session Telnyx builds from its recordings: opt-in.
    room_compositions: bool = False
    composition_key_template: str = SOURCES[COMPOSITIONS].default_key_template

    def enabled(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, on in (
                (RECORDINGS, self.room_recordings),
                (COMPOSITIONS, self.room_compositions),
            )
            if on
        )

    def key_template(self, source: str, recordings: str) -> str:
        """The key template of ``source`` (``recordings``: storage.key_template)."""
        return self.composition_key_template if source == COMPOSITIONS else recordings


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    # Delete an archived copy (media and sidecar; on S3 every version) once its recording
    # ended this many days ago: never under a legal hold, never while Object Lock retention
    # runs. None: copies are kept for ever.
    delete_after_days: int | None = None


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    format: str = "auto"
    level: str = "info"
    file: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    telnyx: TelnyxSettings = field(default_factory=TelnyxSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    sources: SourcesSettings = field(default_factory=SourcesSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source_file: Path | None = None


# -- loading ---------------------------------------------------------------------------------


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def load_settings(
    explicit: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    read_files: bool = True,
) -> Settings:
    """Read, validate and freeze the configuration. Raises ConfigError listing every problem.

    ``overrides`` maps dotted keys (``"storage.path"``) to values, applied over the file.
    """
    env = os.environ if env is None else env
    path = find_config_file(explicit, env) if read_files else None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = raw
        for part in section.split("."):
            target = target.setdefault(part, {})
        target[key] = value
    # Absolute: paths are joined to it once per key, and a relative one would join twice.
    base_dir = (path.parent if path is not None else Path.cwd()).absolute()
    return _build(raw, base_dir, env, path)


def _build(
    raw: dict[str, Any], base_dir: Path, env: Mapping[str, str], path: Path | None
) -> Settings:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Settings)} - {"source_file"}
    for name in raw:
        if name not in known:
            problems.append(f"{name}: unknown section")
    hints = get_type_hints(Settings)
    for name in sorted(known):
        table = raw.get(name, {})
        cls = _dataclass_of(hints[name])
        if not isinstance(table, dict):
            problems.append(f"{name}: must be a table")
            table = {}
        sections[name] = _section(cls, table, name, base_dir, problems)
    sections["telnyx"] = _with_api_key(sections["telnyx"], base_dir, env, problems)
    sections["storage"] = dataclasses.replace(
        sections["storage"], path=_under(base_dir, sections["storage"].path)
    )
    sections["ledger"] = dataclasses.replace(
        sections["ledger"], path=_under(base_dir, sections["ledger"].path)
    )
    _cross_checks(sections, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(**sections, source_file=path)


def _dataclass_of(tp: Any) -> type[Any]:
    for candidate in (tp, *get_args(tp)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    raise TypeError(tp)


_COMPUTED = {("telnyx", "api_key")}


def _section(
    cls: type[Any], table: dict[str, Any], prefix: str, base_dir: Path, problems: list[str]
) -> Any:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names or (prefix.split(".")[0], key) in _COMPUTED:
            problems.append(f"{prefix}.{key}: unknown key")
    for f in dataclasses.fields(cls):
        if f.name not in table:
            continue
        dotted = f"{prefix}.{f.name}"
        value = table[f.name]
        tp = hints[f.name]
        nested = _nested_dataclass(tp)
        if nested is not None:
            if not isinstance(value, dict):
                problems.append(f"{dotted}: must be a table")
                continue
            values[f.name] = _section(nested, value, dotted, base_dir, problems)
            continue
        ok, converted = _convert(value, tp, base_dir)
        if not ok:
            problems.append(f"{dotted}: expected {_describe(tp)}, got {type(value).__name__}")
            continue
        values[f.name] = converted
    return cls(**values)


def _nested_dataclass(tp: Any) -> type[Any] | None:
    for candidate in (tp, *get_args(tp)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def _convert(value: Any, tp: Any, base_dir: Path) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (value == "" and type(None) in args):
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, converted = _convert(value, arg, base_dir)
            if ok:
                return True, converted
        return False, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if tp is Path:
        if not isinstance(value, str) or not value:
            return False, None
        return True, _under(base_dir, Path(value).expanduser())
    if origin is Mapping or tp is Mapping:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        return ok, dict(value) if ok else None
    return False, None


def _describe(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if tp is Path:
        return "a path string"
    if get_origin(tp) is Mapping:
        return "a table of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _with_api_key(
    telnyx: TelnyxSettings, base_dir: Path, env: Mapping[str, str], problems: list[str]
) -> TelnyxSettings:
    key: str | None = env.get(telnyx.api_key_env) or None
    candidates: list[Path] = []
    if telnyx.api_key_file is not None:
        candidates.append(telnyx.api_key_file)
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    if key is None:
        for candidate in candidates:
            try:
                key = candidate.read_text(encoding="utf-8").strip() or None
            except FileNotFoundError:
                if candidate == telnyx.api_key_file:
                    problems.append(f"telnyx.api_key_file: {candidate} does not exist")
                continue
            except OSError as exc:
                problems.append(f"telnyx.api_key_file: cannot read {candidate}: {exc.strerror}")
                continue
            if key:
                break
    return dataclasses.replace(telnyx, api_key=Secret(key) if key else None)


def _under(base_dir: Path, path: Path) -> Path:
    return path if path.is_absolute() else base_dir / path


_TEMPLATE_FIELD = re.compile(r"\{([a-z_]+)(?::[^{}]*)?\}")
TEMPLATE_FIELDS = frozenset(
    {
        "id",
        "room_id",
        "session_id",
        "participant_id",
        "type",
        "codec",
        "ext",
        "ended",
        "started",
        "created",
        "completed",
    }
)


def _template_problems(name: str, template: str) -> list[str]:
    found: list[str] = []
    used = set(_TEMPLATE_FIELD.findall(template))
    unknown = used - TEMPLATE_FIELDS
    if unknown:
        found.append(
            f"{name}: unknown field(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(TEMPLATE_FIELDS))}"
        )
    if "id" not in used:
        found.append(f"{name}: must contain {{id}} so every recording has its own key")
    if template.startswith("/") or ".." in template.split("/"):
        found.append(f"{name}: must be a relative path without '..'")
    return found


def _cross_checks(s: dict[str, Any], problems: list[str]) -> None:
    telnyx: TelnyxSettings = s["telnyx"]
    storage: StorageSettings = s["storage"]
    workers: WorkerSettings = s["workers"]
    daemon: DaemonSettings = s["daemon"]
    logging: LoggingSettings = s["logging"]
    if not re.match(r"^https?://[^/\s]+", telnyx.base_url):
        problems.append("telnyx.base_url: must be an http(s) URL")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", telnyx.api_key_env):
        problems.append("telnyx.api_key_env: must be an environment variable name")
    if not 1 <= telnyx.page_size <= 250:
        problems.append("telnyx.page_size: must be between 1 and 250")
    for name in ("timeout", "max_retry_seconds", "max_backoff"):
        if getattr(telnyx, name) <= 0:
            problems.append(f"telnyx.{name}: must be positive")
    if telnyx.max_attempts < 1:
        problems.append("telnyx.max_attempts: must be at least 1")
    # Each backend owns its rules (S3's limits, Object Lock, tags), in pure modules.
    problems.extend(storage_registry.check(storage))
    sources: SourcesSettings = s["sources"]
    problems.extend(_template_problems("storage.key_template", storage.key_template))
    problems.extend(
        _template_problems("sources.composition_key_template", sources.composition_key_template)
    )
    if not sources.enabled():
        problems.append("sources: room_recordings and room_compositions are both off")
    if not 1 <= workers.concurrency <= 256:
        problems.append("workers.concurrency: must be between 1 and 256")
    for name in ("max_attempts", "transfer_attempts", "max_interruptions"):
        if getattr(workers, name) < 1:
            problems.append(f"workers.{name}: must be at least 1")
    for name in ("lease_seconds", "url_max_age", "read_timeout", "connect_timeout"):
        if getattr(workers, name) <= 0:
            problems.append(f"workers.{name}: must be positive")
    if workers.min_throughput < 0:
        problems.append("workers.min_throughput: must not be negative (0 turns the floor off)")
    if not 64 * 1024 <= workers.chunk_size <= 64 * 1024 * 1024:
        problems.append("workers.chunk_size: must be between 65536 and 67108864")
    if s["backfill"].max_passes < 0 or s["backfill"].processing_wait < 0:
        problems.append("backfill.max_passes / backfill.processing_wait: must not be negative")
    if daemon.poll_interval <= 0:
        problems.append("daemon.poll_interval: must be positive")
    days = s["retention"].delete_after_days
    if days is not None:
        locked = storage.s3.retention_days if storage.backend == "s3" and storage.s3 else None
        if days < 1:
            problems.append("retention.delete_after_days: must be at least 1")
        elif locked is not None and days < locked:
            problems.append(
                f"retention.delete_after_days ({days}) is shorter than storage.s3.retention_days "
                f"({locked}): Object Lock would keep every copy past the day it must go"
            )
    if isinstance(daemon.first_start, str) and daemon.first_start != "all":
        problems.append('daemon.first_start: must be "all" or a number of days')
    if isinstance(daemon.first_start, int) and daemon.first_start < 0:
        problems.append("daemon.first_start: must not be negative")
    if daemon.rescan_days < 0 or daemon.overlap_days < 0:
        problems.append("daemon.rescan_days / daemon.overlap_days: must not be negative")
    if daemon.shutdown_grace < 0:
        problems.append("daemon.shutdown_grace: must not be negative")
    for name in ("metrics_port", "webhook_port"):
        if not 0 <= getattr(daemon, name) <= 65535:
            problems.append(f"daemon.{name}: must be a port number (0 disables)")
    if logging.format not in ("auto", "text", "json"):
        problems.append("logging.format: must be 'auto', 'text' or 'json'")
    if logging.level.lower() not in ("debug", "info", "warning", "error"):
        problems.append("logging.level: must be debug, info, warning or error")
    if s["source"].media_check and shutil.which("ffprobe") is None:
        problems.append(
            "source.media_check: ffprobe is not on PATH (install the Debian package ffmpeg)"
        )
    url = s["ledger"].url
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        problems.append("ledger.url: must be a postgresql:// URL")
    if url is not None and re.match(r"^[a-z]+://[^/@]*:[^/@]*@", url):
        problems.append(
            "ledger.url: must not contain a password; set PGPASSWORD or ledger.password_file"
        )
