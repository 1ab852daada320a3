"""The run configuration: one validated tree, fed by a workflow file, the
environment (``FCN_PIPELINE_<SECTION>_<KEY>``) and the command line, in that
order of precedence from lowest to highest. Unknown keys are rejected.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipeline.errors import ConfigError

SCHEMA_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
#: Upper bounds of sizes and counts, far beyond any machine's, so that a typo is a usage
#: error rather than an overflow deep in a library.
MAX_TILE = 65536
MAX_BATCH = 4096
MAX_THREADS = 1024
MAX_WORKERS = 100_000
#: Default most bands and pixels a scene may declare (``input.max_bands``,
#: ``input.max_pixels``; :mod:`pipeline.limits`): imaging spectrometers record 200 to
#: 450 bands; 1e11 pixels is ten 100,000 x 100,000 px mosaics.
DEFAULT_MAX_BANDS = 1024
DEFAULT_MAX_PIXELS = 10**11
PRECISIONS = ("fp32", "bf16", "fp16")
#: How tiles are stitched (:mod:`pipeline.prediction`).
STITCHES = ("crop", "blend")
#: A host name or IPv4 address (compute.listen).
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}

#: Section -> key -> (attribute of RunConfig, type). The tree users write.
_LAYOUT: dict[str, dict[str, tuple[str, type]]] = {
    "": {"scenes": ("scenes", list), "model": ("model", str), "output": ("output", str),
         "trust_spec_code": ("trust_spec_code", bool)},
    "tiling": {
        "tile_size": ("tile_size", int),
        "batch_size": ("batch_size", int),
        "memory_budget": ("memory_budget", int),
        "halo": ("halo", tuple),
        "stitch": ("stitch", str),
    },
    "compute": {
        "device": ("device", str),
        "scheduler": ("scheduler", str),
        "listen": ("listen", str),
        "tls_ca_file": ("tls_ca_file", str),
        "tls_cert": ("tls_cert", str),
        "tls_key": ("tls_key", str),
        "workers": ("workers", int),
        "threads_per_worker": ("threads_per_worker", int),
        "gpu_resource": ("gpu_resource", bool),
        "precision": ("precision", str),
        "channels_last": ("channels_last", bool),
        "compile": ("compile", bool),
    },
    "outputs": {"probabilities": ("probabilities", bool), "overwrite": ("overwrite", bool)},
    "input": {
        "allow_no_crs": ("allow_no_crs", bool),
        "allow_vrt": ("allow_vrt", bool),
        "max_bands": ("max_bands", int),
        "max_pixels": ("max_pixels", int),
    },
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to know; see ``workflows/README.md`` for the file form."""

    scenes: tuple[str, ...] = ()
    model: str = "demo"
    output: str = ""
    #: The model spec's import path may run (``--trust-spec-code``); it decides no output,
    #: so it is no part of a scene's fingerprint.
    trust_spec_code: bool = False
    tile_size: int | None = None
    batch_size: int = 1
    memory_budget: int | None = None
    #: A declared halo ``(rows, cols)`` in px (``--halo``), over the spec's ``halo``; None:
    #: derived from the receptive field, or the spec's.
    halo: tuple[int, int] | None = None
    stitch: str = "crop"
    device: str = "auto"
    scheduler: str | None = None
    #: The interface the embedded cluster's scheduler, dashboard and workers bind to.
    listen: str = "127.0.0.1"
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    gpu_resource: bool | None = None
    precision: str = "fp32"
    channels_last: bool | None = None
    compile: bool = False
    probabilities: bool = False
    overwrite: bool = False
    allow_no_crs: bool = False
    allow_vrt: bool = False
    max_bands: int = DEFAULT_MAX_BANDS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_bands < 1 or self.max_pixels < 1:
            raise ConfigError(f"input.max_bands and input.max_pixels must be at least 1, got "
                              f"{self.max_bands} and {self.max_pixels}")
        if self.tile_size is not None and not 16 <= self.tile_size <= MAX_TILE:
            raise ConfigError(f"tiling.tile_size must be from 16 to {MAX_TILE} pixels, got "
                              f"{self.tile_size}")
        if self.batch_size > MAX_BATCH:
            raise ConfigError(f"tiling.batch_size must be at most {MAX_BATCH}, got "
                              f"{self.batch_size}")
        if self.threads_per_worker > MAX_THREADS or (self.workers or 0) > MAX_WORKERS:
            raise ConfigError(f"compute.threads_per_worker must be at most {MAX_THREADS} and "
                              f"compute.workers at most {MAX_WORKERS}, got "
                              f"{self.threads_per_worker} and {self.workers}")
        if self.memory_budget is not None and self.memory_budget < 2**20:
            raise ConfigError(
                f"tiling.memory_budget must be at least 1MiB, got {self.memory_budget} bytes"
            )
        if self.batch_size < 1:
            raise ConfigError(f"tiling.batch_size must be at least 1, got {self.batch_size}")
        if self.stitch not in STITCHES:
            raise ConfigError(
                f"tiling.stitch must be one of {', '.join(STITCHES)}, got {self.stitch!r}")
        if self.halo is not None and not (
                len(self.halo) == 2 and all(0 <= h <= MAX_TILE for h in self.halo)):
            raise ConfigError(f"tiling.halo must be px from 0 to {MAX_TILE}, one number or "
                              f"rows,cols, got {self.halo!r}")
        if self.device not in DEVICES:
            raise ConfigError(
                f"compute.device must be one of {', '.join(DEVICES)}, got {self.device!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"compute.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"compute.workers must be at least 1, got {self.workers}")
        if not _HOST.fullmatch(self.listen):
            raise ConfigError(f"compute.listen must be a host name or IPv4 address, without a "
                              f"port, to bind the embedded cluster to (127.0.0.1, 0.0.0.0), got "
                              f"{self.listen!r}")
        if self.threads_per_worker < 1:
            raise ConfigError(
                f"compute.threads_per_worker must be at least 1, got {self.threads_per_worker}"
            )

    def with_overrides(self, **values: Any) -> RunConfig:
        """A copy with the non-``None`` values replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_tree(self) -> dict[str, Any]:
        """The nested form, as written in workflow files and run manifests."""
        flat = asdict(self)
        tree: dict[str, Any] = {"schema": SCHEMA_VERSION}
        for section, keys in _LAYOUT.items():
            target = tree if not section else tree.setdefault(section, {})
            for key, (attr, _) in keys.items():
                value = flat[attr]
                if attr in ("tile_size", "halo") and value is None:
                    value = "auto"
                target[key] = list(value) if isinstance(value, tuple) else value
        return tree


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_workers(threads_per_worker: int) -> int:
    """Workers of ``threads_per_worker`` threads that fill this process's usable cores
    (at least one): how many a CPU cluster starts unless told."""
    return max(1, usable_cores() // threads_per_worker)


def parse_bytes(text: str | int) -> int:
    """Bytes from an int or a string such as ``2GiB``, ``512 MiB`` or ``1.5GB``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise ConfigError(
            f"{text!r} is not a size in bytes (examples: 2GiB, 512MiB, 1000000)"
        ) from None


def parse_count(text: str | float | int, where: str = "") -> int:
    """A whole number from an int or a string such as ``100000000000`` or ``1e11``;
    ``where`` (a setting or option) begins the error's line."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        number = float(str(text).strip())
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise ConfigError(f"{where + ': ' if where else ''}{text!r} is not a whole number "
                          "(examples: 1024, 1e11)")
    return int(number)


def parse_halo(value: Any, where: str = "halo") -> tuple[int, int] | None:
    """A halo ``(rows, cols)`` in px from ``16``, ``"16"``, ``"8,16"`` or ``[8, 16]``;
    ``auto`` is None (derived from the receptive field, or the spec's).

    Raises:
        ConfigError: anything else (one line naming ``where``).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    items: list[Any]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    numbers: list[int] = []
    for item in items:
        if isinstance(item, bool):
            numbers = []
            break
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            numbers.append(int(item))
        else:
            numbers = []
            break
    if len(numbers) not in (1, 2):
        raise ConfigError(f"{where} must be px: one number, or rows,cols (16 or 8,16), "
                          f"or auto, got {value!r}")
    return (numbers[0], numbers[-1])


def _coerce(where: str, value: Any, kind: type) -> Any:
    if "tile_size" in where and isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if kind is tuple:
        return parse_halo(value, where)
    if "max_pixels" in where and isinstance(value, (str, float)):
        return parse_count(value, where)
    if "memory_budget" in where and isinstance(value, str):
        try:
            return parse_bytes(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1", "true", "yes", "on", "0", "false", "no", "off"
        ):
            return value.lower() in ("1", "true", "yes", "on")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is list:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")


def values_from_tree(tree: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Flat RunConfig values from the nested form; unknown keys are errors."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    schema = tree.get("schema")
    if schema != SCHEMA_VERSION:
        raise ConfigError(f"{source}: schema must be {SCHEMA_VERSION}, got {schema!r}")
    values: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "schema":
            continue
        if key in _LAYOUT[""]:
            attr, kind = _LAYOUT[""][key]
            values[attr] = _coerce(f"{source}: {key}", value, kind)
        elif key in _LAYOUT and key:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {key} must be a mapping")
            for sub, sub_value in value.items():
                if sub not in _LAYOUT[key]:
                    raise ConfigError(
                        f"{source}: {key}.{sub} is not a known setting "
                        f"(known: {', '.join(_LAYOUT[key])})"
                    )
                attr, kind = _LAYOUT[key][sub]
                if sub_value is None and attr in ("scheduler", "workers", "gpu_resource",
                                                  "tls_ca_file", "tls_cert", "tls_key",
                                                  "channels_last", "halo",
                                                  "memory_budget"):
                    continue
                values[attr] = _coerce(f"{source}: {key}.{sub}", sub_value, kind)
        else:
            known = [k for k in _LAYOUT[""]] + [k for k in _LAYOUT if k]
            raise ConfigError(f"{source}: {key} is not a known setting (known: {', '.join(known)})")
    return values


def values_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """RunConfig values from ``FCN_PIPELINE_<SECTION>_<KEY>`` variables.

    Top-level keys are ``FCN_PIPELINE_MODEL`` and ``FCN_PIPELINE_OUTPUT``;
    an unknown ``FCN_PIPELINE_`` variable is an error, not silently ignored.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    names = {}
    for section, keys in _LAYOUT.items():
        for key, (attr, kind) in keys.items():
            if key == "scenes":
                continue
            name = "FCN_PIPELINE_" + (f"{section}_{key}" if section else key).upper()
            names[name] = (attr, kind, f"{section + '.' if section else ''}{key}")
    for name, raw in env.items():
        if not name.startswith("FCN_PIPELINE_"):
            continue
        if name not in names:
            raise ConfigError(f"environment variable {name} is not a known setting "
                              f"(known: {', '.join(sorted(names))})")
        attr, kind, where = names[name]
        values[attr] = _coerce(f"{name} ({where})", raw, kind)
    return values


def resolve(*layers: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from flat value layers, later layers overriding earlier ones."""
    merged: dict[str, Any] = {}
    known = {f.name for f in fields(RunConfig)}
    for layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key}")
            if value is not None:
                merged[key] = value
    return RunConfig(**merged)
