"""Workflow files: a run configuration tree in YAML, with a ``{date}`` placeholder.

A workflow file says *what* to run (scenes, model, tiling, outputs); it is the
lowest layer of the configuration, below ``FCN_PIPELINE_*`` environment
variables and the command line (see ``workflows/README.md``).

``{date}`` in ``scenes`` entries and in ``output`` becomes the run date
(ISO ``YYYY-MM-DD``, by default today in UTC). Relative paths in a workflow
(scenes, output, model) are left as written: they are relative to the
current directory of the run, not to the workflow file.

Pure: reads one YAML file (:mod:`pipeline.yaml_input`), imports neither torch nor dask.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, resolve, values_from_tree
from pipeline.errors import ConfigError
from pipeline.yaml_input import read_yaml

#: The placeholder replaced by the run date, and the top-level keys it is replaced in.
DATE_PLACEHOLDER = "{date}"
DATED_KEYS = ("scenes", "output")

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
#: The key path at the start of a config error message ("tiling.tile_size must ...").
_KEY_IN_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\b")


def run_date(date: str | None = None) -> str:
    """The run date as ``YYYY-MM-DD``: ``date`` checked, or today in UTC."""
    if date is None:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    if not isinstance(date, str) or not _DATE.fullmatch(date):
        raise ConfigError(
            f"date must be an ISO date YYYY-MM-DD (for example 2024-06-30), got {date!r}"
        )
    try:
        dt.date.fromisoformat(date)
    except ValueError as exc:
        raise ConfigError(f"date {date} is not a calendar date ({exc})") from exc
    return date


# --------------------------------------------------------------------------- workflows


def _locate(message: str, path: Path, lines: Mapping[str, int]) -> str:
    """``FILE:LINE: key ...`` for a config message about ``key ...`` (line when known)."""
    prefix = f"{path}: "
    body = message[len(prefix):] if message.startswith(prefix) else message
    match = _KEY_IN_MESSAGE.match(body)
    line = lines.get(match.group(1)) if match else None
    return f"{path}:{line}: {body}" if line else f"{path}: {body}"


def _substitute(tree: dict[str, Any], date: str, path: Path, lines: Mapping[str, int]) -> None:
    """Replace ``{date}`` in scenes and output in place; refuse other placeholders."""

    def fill(key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value  # a wrong type is reported by values_from_tree
        for found in _PLACEHOLDER.findall(value):
            if found != DATE_PLACEHOLDER:
                raise ConfigError(_locate(
                    f"{key} has the unknown placeholder {found} in {value!r} "
                    f"(the only placeholder is {DATE_PLACEHOLDER})", path, lines))
        return value.replace(DATE_PLACEHOLDER, date)

    for key in DATED_KEYS:
        if key not in tree:
            continue
        value = tree[key]
        tree[key] = [fill(key, v) for v in value] if isinstance(value, list) else fill(key, value)

    for key, value in _strings(tree):
        if key.split(".")[0] not in DATED_KEYS and DATE_PLACEHOLDER in value:
            raise ConfigError(_locate(
                f"{key} contains {DATE_PLACEHOLDER}, which is only replaced in "
                f"{' and '.join(DATED_KEYS)}", path, lines))


def _strings(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, str):
            found.append((name, value))
        elif isinstance(value, Mapping):
            found.extend(_strings(value, f"{name}."))
    return found


def _load(
    path: str | PathLike[str], date: str | None
) -> tuple[dict[str, Any], Path, Mapping[str, int]]:
    path = Path(path)
    day = run_date(date)
    document = read_yaml(path, what="workflow")
    tree, lines = document.data, document.lines
    if tree is None:
        raise ConfigError(f"{path}: the workflow is empty")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a workflow is a mapping (schema: 1, scenes, model, ...), "
                          f"not a {type(tree).__name__}")
    _substitute(tree, day, path, lines)
    try:
        values = values_from_tree(tree, source=str(path))
    except ConfigError as exc:
        raise ConfigError(_locate(str(exc), path, lines)) from exc
    return values, path, lines


def load_workflow(path: str | PathLike[str], *, date: str | None = None) -> dict[str, Any]:
    """Flat RunConfig values from a workflow file, ``{date}`` filled in.

    ``date`` is ``YYYY-MM-DD`` (default: today in UTC). Relative paths stay
    relative to the current directory. Errors (YAML syntax, duplicate or
    unknown keys, wrong types, a bad date) are ConfigErrors naming the file,
    and the line and key where known.
    """
    values, _, _ = _load(path, date)
    return values


def validate_workflow(path: str | PathLike[str], *, date: str | None = None) -> RunConfig:
    """The RunConfig a workflow file gives on its own (defaults for what it leaves out).

    Checks everything the configuration can check without touching the files
    it names: keys, types and values (tile size, batch size, device, ...).
    """
    values, path, lines = _load(path, date)
    try:
        return resolve(values)
    except ConfigError as exc:
        raise ConfigError(_locate(str(exc), path, lines)) from exc
