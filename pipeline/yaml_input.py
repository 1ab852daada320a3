"""YAML from users: model specs, workflows, cluster specs, ``--argument KEY=YAML``.

Every YAML text the package reads from a user goes through :func:`read_yaml` or
:func:`parse_yaml`, which keep a hostile file from costing more than reading it
(:func:`read_text` is the first step, for any text file of a user's: a STAC Item
describing a model is JSON):

- only a regular file is read, opened without blocking (a named pipe or a device
  given as a file is refused at once instead of waiting for a writer), and at most
  :data:`MAX_BYTES` bytes of it (a spec or workflow is a few kB);
- PyYAML's event stream (its parser is iterative) is checked before anything is
  composed or constructed (both recursive): anchors (``&a``), aliases (``*a``) and
  merge keys (``<<``) are refused, so no value is ever shared or repeated (the
  "billion laughs" expansion), and lists and mappings may nest at most
  :data:`MAX_DEPTH` levels, so composing never exhausts Python's stack;
- a number (a scalar PyYAML's resolver reads as an int or a float) longer than
  :data:`MAX_NUMBER_CHARS` characters is refused before it is converted (a
  thousand-digit integer costs quadratic time, and Python refuses to print one),
  and so is a YAML 1.1 base-60 number such as ``1:0:0`` (3600 to PyYAML, a string
  to YAML 1.2 readers; a long one costs seconds per kB): quote it, or write the
  number in decimal;
- the checked events are then composed and constructed with PyYAML's safe
  constructor (plain values only: no Python objects), and a key repeated in one
  mapping is refused (PyYAML would keep the last silently).

Every problem is one line, ``FILE:LINE: ...``, raised as the error class the caller
names (a :class:`~pipeline.errors.ConfigError` unless told otherwise).

Pure: the standard library and PyYAML only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    Event,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from pipeline.errors import ConfigError, PipelineError

#: The most bytes read from one YAML text (1 MiB).
MAX_BYTES = 1 << 20
#: The deepest nesting of lists and mappings accepted.
MAX_DEPTH = 64
#: libyaml's parser when PyYAML has it (several times faster), else PyYAML's own.
_PARSER = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
#: The longest number accepted, in characters (a float64 needs at most 24).
MAX_NUMBER_CHARS = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
#: The tags PyYAML's SafeLoader gives plain scalars (its resolver holds no state).
_RESOLVER = Resolver()


@dataclass(frozen=True)
class YamlDocument:
    """A YAML document read by :func:`read_yaml` or :func:`parse_yaml`.

    ``data`` holds plain values (dict, list, str, int, float, bool, None, dates);
    ``lines`` maps each mapping key of the top two levels, as a dotted path
    (``tiling.tile_size``), to its 1-based line.
    """

    data: Any
    lines: Mapping[str, int] = field(default_factory=dict)


def read_yaml(path: str | PathLike[str], *, what: str,
              error: type[PipelineError] = ConfigError, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> YamlDocument:
    """Read one YAML document from ``path`` (UTF-8), checked as the module docstring says.

    Args:
        path: The file.
        what: What the file is, for messages ("workflow", "model spec", "cluster spec").
        error: The class of the error raised.
        max_bytes: Files larger than this are refused unread.
        max_depth: The deepest nesting of lists and mappings accepted.

    Returns:
        The document; ``data`` is None for an empty file.

    Raises:
        error: one line naming the file (and the line where there is one): the file
            cannot be read, is not a regular file, is larger than ``max_bytes``, is not
            UTF-8, is not valid YAML or holds more than one document, nests deeper than
            ``max_depth``, uses an anchor, alias or merge key, a number longer than
            :data:`MAX_NUMBER_CHARS` or a base-60 number, or repeats a key in one mapping.
    """
    text = read_text(path, what=what, error=error, max_bytes=max_bytes)
    return parse_yaml(text, source=str(path), what=what, error=error, max_bytes=max_bytes,
                      max_depth=max_depth)


def read_text(path: str | PathLike[str], *, what: str,
              error: type[PipelineError] = ConfigError, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a user's file, read as the module docstring says: a regular file
    only (a named pipe or a device is refused without waiting), at most ``max_bytes``.

    Raises:
        error: one line naming the file: it cannot be read, is not a regular file, is
            larger than ``max_bytes`` or is not UTF-8.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a named pipe for reading would wait for a writer
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise error(f"{path}: the {what} is {_file_kind(mode)}, not a regular file; "
                            f"give the {what} file itself")
            raw = stream.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if len(raw) > max_bytes:
        raise error(_too_big(str(path), what, max_bytes))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: cannot read the {what} (it is not UTF-8 text: {exc.reason} at "
                    f"byte {exc.start})") from exc


def parse_yaml(text: str, *, source: str, what: str, error: type[PipelineError] = ConfigError,
               max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> YamlDocument:
    """Parse one YAML document from ``text``; ``source`` names it in messages (a file, or
    an option such as ``--argument base``). Checks and errors as :func:`read_yaml`."""
    if len(text) > max_bytes or len(text.encode("utf-8")) > max_bytes:
        raise error(_too_big(source, what, max_bytes))
    try:
        events = _checked_events(text, what, max_depth)
        builder = _Builder(events)
        try:
            node = builder.get_single_node()
            data = builder.construct_document(node) if node is not None else None
        finally:
            builder.dispose()
    except _Refused as exc:
        raise error(f"{source}:{exc.line}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = " ".join(" ".join(p.split()) for p in (exc.context, exc.problem) if p)
        if isinstance(exc, _DuplicateKey):
            raise error(f"{where}: {problem}; a key may appear once per mapping") from None
        if "maximum nesting depth" in problem:  # libyaml's scanner stops sooner than ours
            raise error(f"{where}: {_too_deep(what, max_depth)}") from None
        raise error(f"{where}: the {what} is not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: the {what} is not valid YAML: {' '.join(str(exc).split())}"
                    ) from None
    return YamlDocument(data, _key_lines(node))


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for messages."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _too_big(source: str, what: str, max_bytes: int) -> str:
    return (f"{source}: the {what} is larger than {max_bytes // 1024} KiB, the most read from "
            f"a user's file; a {what} is a few kB (is it the right file?)")


def _too_deep(what: str, max_depth: int) -> str:
    return f"the {what} nests lists and mappings deeper than {max_depth} levels, the most accepted"


class _Refused(Exception):
    """A construct the event check refuses, at a 1-based line."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


def _checked_events(text: str, what: str, max_depth: int) -> list[Event]:
    """The parser's events for ``text``, stopped at the first refused construct.

    The parser keeps its own stack of states (no recursion), so a document nested a
    million levels deep is refused after ``max_depth + 1`` levels were read.
    """
    events: list[Event] = []
    # One entry per open collection: None for a list, for a mapping whether its next
    # node is a key.
    open_collections: list[bool | None] = []
    for event in yaml.parse(text, Loader=_PARSER):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, AliasEvent):
            raise _Refused(line, f"the alias *{event.anchor} is refused: a {what} may not use "
                                 "YAML anchors and aliases (write the value out)")
        if isinstance(event, NodeEvent):
            if event.anchor is not None:
                raise _Refused(line, f"the anchor &{event.anchor} is refused: a {what} may not "
                                     "use YAML anchors and aliases (write the value out)")
            is_key = bool(open_collections) and open_collections[-1] is True
            if open_collections and open_collections[-1] is not None:
                open_collections[-1] = not is_key
            merge = getattr(event, "tag", None) == _MERGE_TAG or (
                is_key and isinstance(event, ScalarEvent) and event.value == "<<"
                and event.implicit[0])
            if merge:
                raise _Refused(line, f"the merge key << is refused: a {what} may not use merge "
                                     "keys (write the keys out)")
            if isinstance(event, ScalarEvent):
                _check_number(event, line)
        if isinstance(event, CollectionStartEvent):
            if len(open_collections) >= max_depth:
                raise _Refused(line, _too_deep(what, max_depth))
            open_collections.append(True if isinstance(event, MappingStartEvent) else None)
        elif isinstance(event, CollectionEndEvent):
            open_collections.pop()
        events.append(event)
    return events


def _check_number(event: ScalarEvent, line: int) -> None:
    """Refuse a base-60 number, or one longer than :data:`MAX_NUMBER_CHARS`, before
    PyYAML converts it (both are only looked for in a scalar that could be one)."""
    value = event.value
    if len(value) <= MAX_NUMBER_CHARS and ":" not in value:
        return
    tag = event.tag
    if tag is None or tag == "!":  # as the composer resolves it
        tag = _RESOLVER.resolve(ScalarNode, value, event.implicit)
    if tag not in _NUMBER_TAGS:
        return
    shown = value if len(value) <= 24 else f"{value[:20]}..."
    if ":" in value:
        raise _Refused(line, f"{shown} is a base-60 number of YAML 1.1 (1:0:0 reads as 3600), "
                             "which is refused: quote it if it is text, or write the number in "
                             "decimal")
    raise _Refused(line, f"the number {shown} is {len(value)} characters long, more than the "
                         f"{MAX_NUMBER_CHARS} accepted; write it with fewer digits, or quote it "
                         "if it is text")


class _DuplicateKey(ConstructorError):
    """A key repeated in one mapping."""


class _Builder(Composer, SafeConstructor, Resolver):
    """Composes and constructs a document from checked events, as PyYAML's SafeLoader
    would from its parser, and refuses a key repeated in one mapping."""

    def __init__(self, events: list[Event]) -> None:
        self._events = events
        self._next = 0
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    # The parser's interface, over the list of events.
    def check_event(self, *choices: type[Event]) -> bool:
        if self._next >= len(self._events):
            return False
        return not choices or isinstance(self._events[self._next], choices)

    def peek_event(self) -> Event:
        return self._events[self._next]

    def get_event(self) -> Event:
        event = self._events[self._next]
        self._next += 1
        return event

    def dispose(self) -> None:
        self._events = []

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # a date out of range, a huge integer
            raise ConstructorError(None, None, f"the value {node.value!r:.40} cannot be read "
                                   f"({str(exc).split(';')[0]})", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise _DuplicateKey(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key path -> line number (1-based) of each mapping key, two levels deep."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            name = f"{prefix}{key_node.value}"
            lines.setdefault(name, key_node.start_mark.line + 1)
            if not prefix:
                lines.update({k: v for k, v in _key_lines(value_node, f"{name}.").items()
                              if k not in lines})
    return lines
