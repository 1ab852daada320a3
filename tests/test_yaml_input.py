"""YAML that cannot explode: one reader for specs, workflows, cluster specs and
``--argument``, bounded in size and nesting, without anchors, aliases or merge keys.

How each test was checked to have teeth is said in a ``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import Affine

from pipeline import yaml_input
from pipeline.errors import ConfigError, ModelSpecError
from pipeline.modelspec import load_spec
from pipeline.yaml_input import MAX_BYTES, MAX_DEPTH, parse_yaml, read_yaml
from tests.conftest import ROOT, run_cli
from tests.support import cli, other_lines

#: The classic "billion laughs": nine levels of nine aliases, 10**9 strings once expanded.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
BRACKETS = "[" * 50_000 + "]" * 50_000
MERGE = "base: {tile_size: 512}\ntiling:\n  <<: {batch_size: 2}\n  tile_size: 256\n"
ANCHOR = "schema: 1\nname: &n demo\n"
#: Hostile texts and what their one-line refusal says.
HOSTILE = {
    "laughs": (LAUGHS, ":1: the anchor &a is refused"),
    "brackets": (BRACKETS, f":1: the {{what}} nests lists and mappings deeper than {MAX_DEPTH}"),
    "merge": (MERGE, ":3: the merge key << is refused"),
    "anchor": (ANCHOR, ":2: the anchor &n is refused"),
    "oversized": ("# " + "x" * MAX_BYTES + "\n", f"is larger than {MAX_BYTES // 1024} KiB"),
}
PARSERS = {"libyaml": yaml.CSafeLoader, "python": yaml.SafeLoader}


@pytest.fixture(params=list(PARSERS))
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of PyYAML's parsers: libyaml's, used when present, and its own."""
    monkeypatch.setattr(yaml_input, "_PARSER", PARSERS[request.param])
    return str(request.param)


def write(folder: Path, text: str, name: str = "file.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_yaml_is_refused_at_once_in_one_line(tmp_path: Path, case: str,
                                                     parser: str) -> None:
    """Billion laughs, 50,000 nested brackets, a merge key, an anchor without an alias,
    a file over 1 MiB: one ConfigError naming the file and line, in well under a second,
    never a RecursionError.

    Teeth: _checked_events() yielding every event unchecked: the laughs take minutes
    and gigabytes (stopped), the brackets raise RecursionError while composing, the
    merge key is merged, the anchor accepted; read_yaml() reading the whole file: the
    oversized one is parsed.
    """
    text, says = HOSTILE[case]
    path = write(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        read_yaml(path, what="workflow")
    seconds = time.perf_counter() - start
    message = str(caught.value)
    assert message.startswith(f"{path}") and says.format(what="workflow") in message, message
    assert len(message.splitlines()) == 1
    assert seconds < 1.0, f"{case} took {seconds:.2f} s"


def test_the_billion_laughs_answer_in_milliseconds(tmp_path: Path) -> None:
    """The figure for the record: the 1 kB laughs spec is refused in milliseconds (PyYAML's
    safe_load took 56 s and 1 GB on it)."""
    spec = write(tmp_path, "schema: 1\n" + LAUGHS, "laughs.yaml")
    start = time.perf_counter()
    with pytest.raises(ModelSpecError, match="anchor &a is refused"):
        load_spec(spec)
    seconds = time.perf_counter() - start
    print(f"billion laughs spec ({spec.stat().st_size} bytes) refused in {seconds * 1e3:.1f} ms")
    assert seconds < 0.5


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1])
def test_nesting_up_to_the_limit_is_read(parser: str, depth: int) -> None:
    """Teeth: the depth check off by one (> instead of >=): 65 levels are read."""
    flow = "[" * depth + "1" + "]" * depth
    block = "".join(f"{'  ' * k}k{k}:\n" for k in range(depth - 1)) + f"{'  ' * (depth - 1)}k: 1\n"
    for text in (flow, block):
        if depth <= MAX_DEPTH:
            assert parse_yaml(text, source="t", what="test").data is not None
        else:
            with pytest.raises(ConfigError, match=f"deeper than {MAX_DEPTH} levels"):
                parse_yaml(text, source="t", what="test")


@pytest.mark.parametrize(("text", "says"), [
    ("a: 1\nb: 2\na: 3\n", ":3: duplicate key 'a' (first on line 1)"),
    ("a: {x: 1, x: 2}\n", ":1: duplicate key 'x'"),
    ("a: !!python/object/apply:os.system [echo]\n", ":1: the test is not valid YAML"),
    ("a: 2024-13-45\n", "month must be in 1..12"),
    ("a: !!float abc\n", ":1: the test is not valid YAML: the value 'abc' cannot be read"),
    ("a: 1\n---\nb: 2\n", ":2: the test is not valid YAML: expected a single document"),
    ("a: [1\n", ":2: the test is not valid YAML"),
    ("c: &x\n  - *x\n", ":1: the anchor &x is refused"),
    ("a: 1\nb: *x\n", ":2: the alias *x is refused"),
    ("c: {? &k a : 1}\n", ":1: the anchor &k is refused"),
    ("a: !!merge {}\n", ":1: the merge key << is refused"),
])
def test_other_refusals_are_one_line_with_the_line(text: str, says: str) -> None:
    """Teeth: _Builder.construct_mapping() without the duplicate check: the first two
    are accepted; construct_object() without the ValueError guard: the bad date and
    the float that is not one escape as ValueError; without the alias check, a lone alias is
    "found undefined alias"."""
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, source="t.yaml", what="test")
    assert says in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_plain_yaml_reads_as_before() -> None:
    """Values, a quoted "<<" key (not a merge key), and the lines of the top two levels."""
    text = "schema: 1\ntiling:\n  tile_size: 512\nflags: [true, null, 1.5]\n'<<': 2\n"
    document = parse_yaml(text, source="t", what="test")
    assert document.data == {"schema": 1, "tiling": {"tile_size": 512},
                             "flags": [True, None, 1.5], "<<": 2}
    assert dict(document.lines) == {"schema": 1, "tiling": 2, "tiling.tile_size": 3,
                                    "flags": 4, "<<": 5}


#: Numbers refused before PyYAML converts them, and what the one line says.
NUMBERS = {
    "long hex": ("a: 0x" + "f" * 5000 + "\n", "is 5002 characters long, more than the 64"),
    "long decimal": ("a: " + "9" * 5000 + "\n", "is 5000 characters long"),
    "long octal": ("a: 0" + "7" * 6000 + "\n", "is 6001 characters long"),
    "long binary": ("a: 0b" + "1" * 20000 + "\n", "is 20002 characters long"),
    "long float": ("a: 1" + "0" * 400 + ".5\n", "is 403 characters long"),
    "tagged": ("a: !!int " + "1" * 100 + "\n", "is 100 characters long"),
    "base 60": ("a: 1:0:0\n", "1:0:0 is a base-60 number of YAML 1.1"),
    "long base 60": ("schema: 1\nb: 1" + ":59" * 300_000 + "\n",
                     ":2: 1:59:59:59:59:59:59:... is a base-60 number"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_long_and_base_60_numbers_are_refused_before_conversion(case: str, parser: str) -> None:
    """A number over 64 characters or in base 60: one line, at once, never a ValueError
    from Python's 4300-digit limit nor seconds spent converting.

    Teeth: _checked_events() without _check_number(): the hex, octal and binary ones
    are read (Python then cannot print them), the decimal one says "cannot be read",
    1:0:0 is read as 3600, and the 900 kB base-60 one runs for tens of seconds.
    """
    text, says = NUMBERS[case]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, source="t.yaml", what="test")
    assert says in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert time.perf_counter() - start < 1


def test_numbers_and_text_that_look_alike_read_as_before() -> None:
    """Quoted or tagged text, colons that make no number and short numbers stay as
    PyYAML reads them."""
    text = ("a: '1:0:0'\nb: !!str 12:30\nc: repo/image:1.2\nd: 0x1f\ne: -12_000\n"
            "f: 1.5\ng: " + "x" * 100 + "\nh: 12:30:xx\n")
    assert parse_yaml(text, source="t", what="test").data == {
        "a": "1:0:0", "b": "12:30", "c": "repo/image:1.2", "d": 31, "e": -12000, "f": 1.5,
        "g": "x" * 100, "h": "12:30:xx"}


def test_a_file_that_is_not_utf8_or_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"cannot read the workflow \(it is not UTF-8 text"):
        read_yaml(path, what="workflow")
    with pytest.raises(ConfigError, match="cannot read the workflow"):
        read_yaml(tmp_path / "absent.yaml", what="workflow")


# --------------------------------------------------------------------------- through the CLI


def _scene(path: Path) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4600000)) as ds:
        ds.write(np.zeros((3, 32, 32), np.uint8))
    return path


@pytest.mark.slow
def test_hostile_spec_workflow_and_cluster_spec_files_through_the_cli(tmp_path: Path) -> None:
    """Each hostile text as the model spec (``run --model``), the workflow (``validate``)
    and the cluster spec (``run --cluster kubernetes --cluster-spec``): exit 2 with one
    line naming the file and the line, before torch loads (it cannot even be imported).

    Teeth: load_spec() with yaml.safe_load again: the laughs and the brackets spec give
    a traceback (RecursionError) or run for minutes; kube.load_cluster_spec() with
    yaml.safe_load: the merge key is merged and the cluster spec accepted.
    """
    scene = _scene(tmp_path / "scene.tif")
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was loaded')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}
    out = str(tmp_path / "out")
    for case, (text, says) in HOSTILE.items():
        folder = tmp_path / case
        folder.mkdir()
        hostile = write(folder, text, "hostile.yaml")
        workflow = write(folder, f"schema: 1\nscenes: [{scene}]\noutput: {out}\n"
                         f"model: {hostile}\n", "flow.yaml")
        runs = {
            "model spec": ["run", str(scene), "--out", out, "--model", str(hostile)],
            "workflow": ["validate", str(hostile)],
            "cluster spec": ["run", str(scene), "--out", out, "--cluster", "kubernetes",
                             "--cluster-spec", str(hostile), "--dry-run"],
            "model spec of a workflow": ["validate", str(workflow)],
        }
        for what, args in runs.items():
            start = time.perf_counter()
            done = cli(*args, env=env)
            seconds = time.perf_counter() - start
            lines = other_lines(done.stderr)
            expected = says.format(what=what.replace(" of a workflow", ""))
            assert done.returncode == 2, (case, what, done.stderr)
            assert len(lines) == 1 and lines[0].startswith(f"error: {hostile}"), (case, lines)
            assert expected in lines[0], (case, what, lines)
            assert "Traceback" not in done.stderr and seconds < 30, (case, what, seconds)
    assert not (tmp_path / "out").exists()


def test_an_argument_value_is_read_the_same_way() -> None:
    """``bench --argument KEY=YAML`` goes through the same reader: an alias is refused
    with one line naming the option.

    Teeth: the bench command with yaml.safe_load: "base=&a 2" is read as 2 and the
    benchmark starts.
    """
    done = cli("bench", "--model", "unet-small", "--argument", "base=&a 2", "--skip-run")
    assert done.returncode == 2, done.stderr
    lines = other_lines(done.stderr)
    assert lines == ["error: --argument base:1: the anchor &a is refused: a value "
                     "may not use YAML anchors and aliases (write the value out)"], lines


def test_numbers_through_the_cli(tmp_path: Path) -> None:
    """A 5,000-digit hex in a model spec (``run --model``), a 900 kB base-60 number in a
    workflow (``validate``), and ``bench --argument`` with base=1:0:0 (a 23 GB network
    as 3600), a 5,000-digit hex, or no value (null, which the factory cannot compare):
    exit 2, one line naming the file or option, each in about a second.

    Teeth: _checked_events() without _check_number(): the spec and the hex argument
    end in a ValueError traceback (exit 1), the workflow takes tens of seconds,
    base=1:0:0 starts building; bench without the empty-value check: a TypeError
    traceback (exit 1).
    """
    scene = _scene(tmp_path / "scene.tif")
    spec = write(tmp_path, f"name: x\narchitecture: unet-small\nschema: 0x{'f' * 5000}\n",
                 "spec.yaml")
    workflow = write(tmp_path, "schema: 1\nscenes: [a.tif]\noutput: out\n"
                     f"tiling: {{tile_size: 1{':59' * 300_000}}}\n", "flow.yaml")
    runs = {
        ("run", str(scene), "--out", str(tmp_path / "out"), "--model", str(spec)):
            f"error: {spec}:3: the number 0xfffff",
        ("validate", str(workflow)): f"error: {workflow}:4: 1:59:59",
        ("bench", "--model", "unet-small", "--argument", "base=1:0:0", "--skip-run"):
            "error: --argument base:1: 1:0:0 is a base-60 number",
        ("bench", "--model", "unet-small", "--argument", f"base=0x{'f' * 5000}", "--skip-run"):
            "error: --argument base:1: the number 0xfffff",
        ("bench", "--model", "unet-small", "--argument", "base=", "--skip-run"):
            "error: --argument base has no value",
    }
    for args, says in runs.items():
        start = time.perf_counter()
        done = cli(*args)
        seconds = time.perf_counter() - start
        lines = other_lines(done.stderr)
        assert done.returncode == 2, (args[:2], done.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(says), (args[:2], lines)
        assert seconds < 2, (args[:2], seconds)


def test_a_named_pipe_is_refused_at_once_through_the_cli(tmp_path: Path) -> None:
    """A named pipe (no writer) as the model spec, the workflow (``--workflow`` and
    ``validate``) and the cluster spec: exit 2, one line saying it is not a regular
    file, instead of waiting for a writer forever (the run is killed after 30 s).

    Teeth: read_yaml() opening with open(path, "rb") again: each run blocks in open()
    and the test fails on subprocess.TimeoutExpired.
    """
    scene = _scene(tmp_path / "scene.tif")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    out = str(tmp_path / "out")
    runs = {
        "model spec": ["run", str(scene), "--out", out, "--model", str(fifo)],
        "workflow": ["run", str(scene), "--out", out, "--workflow", str(fifo)],
        "validate": ["validate", str(fifo)],
        "cluster spec": ["run", str(scene), "--out", out, "--cluster", "kubernetes",
                         "--cluster-spec", str(fifo), "--dry-run"],
    }
    for what, args in runs.items():
        done = run_cli(*args, timeout=30, env={"PYTHONPATH": str(ROOT)})
        lines = other_lines(done.stderr)
        assert done.returncode == 2, (what, done.stderr[-2000:])
        assert len(lines) == 1 and "is a named pipe (FIFO), not a regular file" in lines[0], \
            (what, lines)
    assert not (tmp_path / "out").exists()
