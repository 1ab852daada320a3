"""Scene arguments as users type them (pipeline.patterns): files first, then patterns with
the shell's rules; ``**`` never descends into linked folders; never into the output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.patterns import expand_scenes


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """scenes/{x.tif, a/y.tif, a/b/z.tif, a/.w.tif, .h/h.tif} with links back up and to
    itself (loops for any walk that follows links)."""
    root = tmp_path / "scenes"
    for rel in ("x.tif", "a/y.tif", "a/b/z.tif", "a/.w.tif", ".h/h.tif", "out/old.tif"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    os.symlink("..", root / "a" / "up")
    os.symlink(".", root / "self")
    return root


def _names(paths: list[str], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_double_star_spans_folders_but_no_links_and_no_hidden_names(tree: Path) -> None:
    """Teeth: glob.glob(recursive=True) instead of _walk_glob: the links loop (this test
    times out) or one file comes back under many names."""
    found = expand_scenes([str(tree / "**" / "*.tif")])
    assert _names(found, tree) == ["a/b/z.tif", "a/y.tif", "out/old.tif", "x.tif"]
    assert _names(expand_scenes([str(tree / "**" / ".w.tif")]), tree) == ["a/.w.tif"]
    assert _names(expand_scenes([str(tree / "a" / "**" / "z.tif")]), tree) == ["a/b/z.tif"]


def test_patterns_never_match_inside_the_output_folder(tree: Path) -> None:
    """Teeth: the out_dir filter removed: out/old.tif (an earlier run's label map) is a
    scene again."""
    found = expand_scenes([str(tree / "**" / "*.tif")], tree / "out")
    assert "out/old.tif" not in _names(found, tree)
    with pytest.raises(ConfigError, match="pattern matched no file outside the output folder"):
        expand_scenes([str(tree / "out" / "*.tif")], tree / "out")
    # A file named explicitly is that file, even inside the output folder.
    assert _names(expand_scenes([str(tree / "out" / "old.tif")], tree / "out"), tree) == [
        "out/old.tif"]


def test_an_existing_file_is_never_a_pattern(tmp_path: Path) -> None:
    """Teeth: has_magic checked before lexists: "scene[1].tif" plans scene1.tif."""
    (tmp_path / "scene[1].tif").write_bytes(b"")
    (tmp_path / "scene1.tif").write_bytes(b"")
    assert _names(expand_scenes([str(tmp_path / "scene[1].tif")]), tmp_path) == ["scene[1].tif"]
    assert _names(expand_scenes([str(tmp_path / "scene[0-9].tif")]), tmp_path) == ["scene1.tif"]
    with pytest.raises(ConfigError, match="pattern matched no file"):
        expand_scenes([str(tmp_path / "none*.tif")])
