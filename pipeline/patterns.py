"""Scene arguments as users type them: files, or glob patterns for names that are not files.

An argument that names an existing file is that file, whatever characters it holds
(``scene[1].tif``); only otherwise is it a pattern. Patterns follow the shell's
rules: ``*``, ``?`` and ``[...]`` within one folder, ``**`` across any number of
folders; names beginning with a dot match only a pattern that begins with one. ``**``
never descends into a linked folder (a link back up would make the walk endless and
label one file many times), and a pattern never matches inside the run's output folder
(the label maps of an earlier run are not scenes to label). Scenes are local files: a
URL or a GDAL virtual file system path (``/vsicurl/...``) that names no local file is
refused.

Pure: the standard library only.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from pathlib import Path

from pipeline.errors import ConfigError


def _matches(parts: list[str], names: list[str]) -> bool:
    """Whether the path components ``names`` match the pattern components ``parts``."""
    if not parts:
        return not names
    head = parts[0]
    if head == "**":  # zero or more components that do not begin with a dot
        if _matches(parts[1:], names):
            return True
        return bool(names) and not names[0].startswith(".") and _matches(parts, names[1:])
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], head) and _matches(parts[1:], names[1:])


def _walk_glob(pattern: str) -> list[str]:
    """Files matching a pattern with ``**``, without descending into linked folders."""
    parts = Path(pattern).parts
    fixed = next(k for k, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(os.curdir)
    rest = list(parts[fixed:])
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        relative = os.path.relpath(folder, root)
        prefix = [] if relative == os.curdir else relative.split(os.sep)
        found += [os.path.join(folder, name) for name in sorted(files)
                  if _matches(rest, [*prefix, name])]
    return found


#: What names a remote dataset rather than a local file: a URL (``http://``, ``s3://``...)
#: or a GDAL virtual file system path (``/vsicurl/``, ``/vsis3/``, ``/vsizip/``...).
_NOT_LOCAL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|/vsi[a-z0-9_]*/)")


def _remote_problem(argument: str) -> str | None:
    """Why a scene argument that names no local file names something else, if it does."""
    found = _NOT_LOCAL.match(argument)
    if found is None or os.path.lexists(argument):
        return None
    kind = "a GDAL virtual file system path" if argument.startswith("/vsi") else "a URL"
    return (f"{argument}: is {kind}, not a local file; fcn-pipeline reads local GeoTIFF/COG "
            "scenes: copy or download it first")


def _inside(path: str, folder: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def expand_scenes(arguments: tuple[str, ...] | list[str],
                  out_dir: Path | None = None) -> list[str]:
    """Absolute scene paths from the arguments, in order, without repeats.

    Args:
        arguments: Files or patterns, as typed.
        out_dir: The run's output folder: patterns match nothing inside it.

    Returns:
        Absolute paths; a plain path that does not exist is kept, so that scene fails
        with "no such file" and the others run.

    Raises:
        ConfigError: no arguments, a pattern that matched no file, or a URL or GDAL
            path that names no local file.
    """
    if not arguments:
        raise ConfigError(
            "no scenes given: pass scene files or patterns, or set scenes in a workflow")
    seen: dict[str, None] = {}
    real: set[str] = set()  # one file named twice (through a link) is labelled once
    for argument in arguments:
        problem = _remote_problem(argument)
        if problem:
            raise ConfigError(problem)
        if os.path.lexists(argument) or not glob.has_magic(argument):
            matches = [argument]
        else:
            found = (_walk_glob(argument) if "**" in argument
                     else [p for p in glob.glob(argument) if not os.path.isdir(p)])
            matches = sorted(p for p in found
                             if out_dir is None or not _inside(p, out_dir))
            if not matches:
                where = " outside the output folder" if found else ""
                raise ConfigError(f"{argument}: pattern matched no file{where}")
        for path in matches:
            target = os.path.realpath(path)
            if target not in real or not os.path.exists(target):
                real.add(target)
                seen.setdefault(os.path.abspath(path), None)
    return list(seen)
