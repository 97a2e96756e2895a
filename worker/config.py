"""Load ``config.yaml``: compose each package's own section model and report errors by key path."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from db.config import CompletionConfig, QueueConfig
from dicom_node.config import DestinationConfig, DicomNodeConfig, Host, Port
from dicom_node.derived import DeviceInfo
from models.config import ModelsConfig

from . import __version__

ENV_DATABASE_URL = "CXR_DATABASE_URL"


_Section = TypeVar("_Section", bound=BaseModel)


def _default(section: type[_Section]) -> Callable[[], _Section]:
    """A section's ``default_factory``: the section with every key at its default. (Passing the
    class itself reads, to mypy without the pydantic plugin, as a constructor with required
    arguments: it does not see ``Field(8, ge=1)`` as a default.)"""
    return lambda: section()


class ConfigError(ValueError):
    """``config.yaml`` could not be read or is invalid; the message lists every problem."""


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


#: resident memory one worker process needs on the CPU (torch, the models, a batch in flight:
#: ~0.8 GB measured), with headroom; ``processes: auto`` never starts more than RAM / this
PROCESS_MEMORY_BYTES = 2 * 1024**3
#: the most worker processes ``processes: auto`` starts (more: set a number)
AUTO_PROCESSES_MAX = 8


def memory_bytes() -> int | None:
    """This machine's physical memory (None where it cannot be read); a cgroup limit, when
    lower, wins (a container's ``memory.max``)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not on Linux
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_worker_name() -> str:
    """``HOST:PID``: unique per process, so leases and events tell two workers apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        default_factory=default_worker_name,
        min_length=1,
        max_length=255,
        description="This process's name in leases and events; must be unique per process",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, le=256)
    poll_interval_seconds: float = Field(1.0, gt=0)
    study_timeout_seconds: float = Field(600.0, gt=0)
    manufacturer: str = "cxr-pacs-worker project"
    overlap: bool = Field(
        True,
        description=(
            "Overlap the stages (worker.stages): read and decode the next batch and finish the "
            "last one while the models run; false: one batch at a time, start to end"
        ),
    )
    prepare_in: Literal["thread", "process"] = Field(
        "thread",
        description=(
            "Where the read/decode stage runs: threads (the decoders release the GIL; no copy of "
            "the pixels) or processes (for CPU-heavy decoding such as JPEG 2000 on many cores)"
        ),
    )
    prepare_workers: int | None = Field(
        None, ge=1, le=256, description="Read/decode workers; null: from the CPU cores"
    )
    finish_workers: int | None = Field(
        None, ge=1, le=64, description="Report/key image/write threads; null: from the CPU cores"
    )
    processes: int | Literal["auto"] = Field(
        1,
        description=(
            "Worker processes (worker.processes): each runs its own queue connection, models and "
            "worker loop on the same database and device, so the Python work of several studies "
            "runs on several cores at once; auto: on CUDA half the cores, on the CPU one per "
            "core, at most 8 and at most one per 2 GiB of memory; 1: the worker loop runs "
            "inside the serve process (no children)"
        ),
    )
    max_inflight_batches: int = Field(
        3,
        ge=2,
        le=64,
        description=(
            "Batches in the overlapped pipeline at once (preparing, in the models, finishing); "
            "bounds memory: about this many batches' images are held"
        ),
    )

    @field_validator("processes")
    @classmethod
    def _processes_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("must be 'auto' or a whole number from 1 to 64")
        return v

    def process_count(self, *, cuda: bool) -> int:
        """How many worker processes ``serve`` runs: ``processes``, or for ``auto`` half the
        cores on CUDA, where the device does the models' work and each process mostly feeds
        it (and holds its own copy of the models in device memory), and one per core on the
        CPU; either way at most 8 (``AUTO_PROCESSES_MAX``) and at most one per 2 GiB of
        memory (``PROCESS_MEMORY_BYTES``), so a large server is not filled by default."""
        if self.processes != "auto":
            return int(self.processes)
        cores = cpu_count()
        count = cores // 2 if cuda else cores
        memory = memory_bytes()
        if memory is not None:
            count = min(count, memory // PROCESS_MEMORY_BYTES)
        return int(max(1, min(count, AUTO_PROCESSES_MAX)))

    def workers(self) -> tuple[int, int]:
        """``(prepare_workers, finish_workers)``, from the cores this process may use where not
        set: all but one for reading and decoding (the models' thread keeps one), and a quarter
        (1 to 4) for finishing, whose Python parts share one interpreter lock."""
        cores = cpu_count()
        prepare = self.prepare_workers or max(1, cores - 1)
        finish = self.finish_workers or max(1, min(4, cores // 4))
        return prepare, finish


class SchedulerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    retention_days: float = Field(
        30.0, gt=0, description="Purge files and rows of finished studies older than this"
    )
    purge_interval_seconds: float = Field(3600.0, gt=0)
    lease_sweep_interval_seconds: float = Field(15.0, gt=0)
    delivery_retry_interval_seconds: float = Field(10.0, gt=0)
    delivery_max_attempts: int = Field(
        10, ge=1, description="Sends of one report to one destination before it is marked failed"
    )
    storage_sweep_seconds: float = Field(
        600.0,
        gt=0,
        description=(
            "How often the SCP side sweeps dicom.storage_dir: stale temp files are removed, stored "
            "files with no queue row are registered (or quarantined when unreadable)"
        ),
    )
    storage_sweep_min_age_seconds: float = Field(
        900.0,
        ge=60,
        description=(
            "The sweep touches only files older than this (and never younger than twice the "
            "longest dicom.*_timeout_s), so a store in flight is never disturbed"
        ),
    )


class LoggingSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line"
    )


class HealthSection(BaseModel):
    """The HTTP endpoint for monitoring: /healthz, /readyz, /metrics (Prometheus)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    host: Host = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all)")
    port: Port = Field(11113, description="TCP port (the DICOM port's neighbour by default)")


class AppConfig(BaseModel):
    """The whole effective configuration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dicom: DicomNodeConfig = Field(default_factory=_default(DicomNodeConfig))
    queue: QueueConfig = Field(default_factory=_default(QueueConfig))
    completion: CompletionConfig = Field(default_factory=_default(CompletionConfig))
    destinations: list[DestinationConfig] = Field(default_factory=list)
    results_dir: Path | None = Field(
        Path("var/results"),
        description=(
            "Also write every report to this folder (the demo's destination); null to disable"
        ),
    )
    worker: WorkerSection = Field(default_factory=_default(WorkerSection))
    scheduler: SchedulerSection = Field(default_factory=_default(SchedulerSection))
    models: ModelsConfig = Field(default_factory=_default(ModelsConfig))
    logging: LoggingSection = Field(default_factory=_default(LoggingSection))
    health: HealthSection = Field(default_factory=_default(HealthSection))

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(dupes)}")
        return v

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} in config (known: {known})")


def device_info(cfg: AppConfig) -> DeviceInfo:
    """The identity every report and key image carries. Its name is the product's, not the worker
    process's (``worker.name``): the series UIDs derive from it and the AE title, so every worker
    of one deployment files a study's reports in one series, and the SCP recognises them when
    PACS routes them back."""
    return DeviceInfo(
        version=__version__, ae_title=cfg.dicom.ae_title, manufacturer=cfg.worker.manufacturer
    )


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            lines.append(
                f"{source}: {path}: unknown key (check the spelling; see config.yaml comments)"
            )
            continue
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            lines.append(f"{source}: {path}: {msg}")
        elif kind == "missing":
            lines.append(f"{source}: {path}: required key is missing")
        else:
            shown = value if not isinstance(value, (dict, list)) else type(value).__name__
            lines.append(f"{source}: {path}: {shown!r} is not valid: {msg}")
    return "\n".join(lines)


def _resolve_relative(cfg: AppConfig, base: Path) -> AppConfig:
    """Make relative paths (storage, sqlite file, results, weights) relative to the config file."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    cfg.dicom.storage_dir = fix(cfg.dicom.storage_dir)
    if cfg.results_dir is not None:
        cfg.results_dir = fix(cfg.results_dir)
    cfg.models.weights_dir = fix(cfg.models.weights_dir)
    url = cfg.queue.database_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        cfg.queue.database_url = prefix + str(fix(Path(url[len(prefix) :])))
    return cfg


def parse_config(
    data: dict[str, Any] | None,
    *,
    source: str = "config.yaml",
    base: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Validate a mapping as the application config. Raises :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if env.get(ENV_DATABASE_URL):
        queue = dict(data.get("queue") or {})
        queue["database_url"] = env[ENV_DATABASE_URL]
        data["queue"] = queue
    try:
        cfg = AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    return _resolve_relative(cfg, base or Path.cwd())


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Read and validate a YAML config file (default: ``$CXR_CONFIG`` or ``./config.yaml``)."""
    env = os.environ if environ is None else environ
    p = Path(path or env.get("CXR_CONFIG") or "config.yaml")
    if not p.exists():
        raise ConfigError(f"{p}: config file not found (pass a path, or set CXR_CONFIG)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return parse_config(data, source=str(p), base=p.resolve().parent, environ=env)
