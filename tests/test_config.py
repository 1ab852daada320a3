"""The run configuration tree: validation, environment, precedence."""

from __future__ import annotations

import socket

import pytest

from pipeline.config import RunConfig, resolve, values_from_env, values_from_tree
from pipeline.errors import ConfigError
from pipeline.plan import name_outputs, output_stem, outputs_for
from pipeline.preflight import check_listen


def test_tree_round_trip_and_defaults(tmp_path) -> None:
    config = RunConfig(scenes=("a.tif",), output="out", tile_size=512, probabilities=True)
    tree = config.to_tree()
    assert tree["schema"] == 1 and tree["tiling"]["tile_size"] == 512
    assert resolve(values_from_tree(tree)) == config


@pytest.mark.parametrize("tree, message", [
    ({"schema": 2}, "schema must be 1"),
    ({"schema": 1, "colour": 1}, "colour is not a known setting"),
    ({"schema": 1, "tiling": {"tile": 5}}, "tiling.tile is not a known setting"),
    ({"schema": 1, "tiling": {"tile_size": "big"}}, "tiling.tile_size must be int"),
    ({"schema": 1, "tiling": {"tile_size": 8}}, "from 16"),
    ({"schema": 1, "compute": {"device": "tpu"}}, "compute.device"),
    ({"schema": 1, "compute": {"workers": 0}}, "compute.workers"),
    ({"schema": 1, "compute": {"listen": "0.0.0.0:8786"}}, "compute.listen .* without a port"),
    ({"schema": 1, "compute": {"listen": "tcp://0.0.0.0"}}, "compute.listen"),
    ({"schema": 1, "compute": {"listen": ""}}, "compute.listen"),
])
def test_bad_trees_name_the_setting(tree, message) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(values_from_tree(tree))


def test_environment_feeds_the_tree_and_the_command_line_wins() -> None:
    env = {"FCN_PIPELINE_TILING_TILE_SIZE": "768", "FCN_PIPELINE_COMPUTE_DEVICE": "cpu",
           "FCN_PIPELINE_OUTPUTS_PROBABILITIES": "yes", "OTHER": "x"}
    config = resolve({"tile_size": 256}, values_from_env(env), {"device": None})
    assert config.tile_size == 768 and config.device == "cpu" and config.probabilities
    assert resolve(values_from_env(env), {"tile_size": 2048}).tile_size == 2048


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="FCN_PIPELINE_TILESIZE"):
        values_from_env({"FCN_PIPELINE_TILESIZE": "1"})


def test_output_names_stay_inside_the_output_directory(tmp_path) -> None:
    for scene in ("../../etc/passwd.tif", "/abs/..hidden.tif", "we ird:name.tif", ".tif"):
        out = outputs_for(scene, tmp_path)
        assert out.store.parent == tmp_path and out.cog.parent == tmp_path
        assert not out.stem.startswith(".") and "/" not in out.stem


def test_output_names_keep_unicode_letters_and_digits(tmp_path) -> None:
    """Teeth: _UNSAFE back to ASCII-only: "снимок-2" becomes "_-2" and this fails."""
    assert output_stem("снимок-2.tif") == "снимок-2"
    assert output_stem("衛星画像 3.tif") == "衛星画像_3"
    assert output_stem("cafe\u0301.tif") == "caf\u00e9"  # NFC: one name, one spelling
    long = output_stem("x" * 400 + ".tif")
    assert len(long.encode()) <= 200 and long != output_stem("x" * 399 + ".tif")


def test_colliding_names_get_a_deterministic_suffix(tmp_path) -> None:
    """Teeth: name_outputs returning plain stems: the stems collide and this fails."""
    scenes = [str(tmp_path / "b" / "x.tif"), str(tmp_path / "a" / "x.tif"),
              str(tmp_path / "a b.tif"), str(tmp_path / "a_b.tif"), str(tmp_path / "X.tif")]
    stems = [o.stem for o in name_outputs(scenes, tmp_path / "out")]
    assert len({s.casefold() for s in stems}) == len(scenes), stems
    # In the order of absolute paths ".../X.tif" < ".../a/x.tif" < ".../b/x.tif": X keeps it.
    assert stems[4] == "X" and all(stems[k].startswith("x-") and len(stems[k]) == 10
                                   for k in (0, 1))
    assert stems[2] == "a_b" and stems[3].startswith("a_b-")
    assert stems == [o.stem for o in name_outputs(scenes, tmp_path / "out")]  # deterministic
    assert [o.stem for o in name_outputs(scenes[::-1], tmp_path / "out")] == stems[::-1]


def test_tile_size_auto_and_memory_budget_units() -> None:
    config = resolve(values_from_tree({"schema": 1, "tiling": {"tile_size": "auto",
                                                               "memory_budget": "1.5GiB"}}))
    assert config.tile_size is None and config.memory_budget == int(1.5 * 2**30)
    assert config.to_tree()["tiling"]["tile_size"] == "auto"
    assert resolve(values_from_env({"FCN_PIPELINE_TILING_TILE_SIZE": "auto"})).tile_size is None
    with pytest.raises(ConfigError, match="memory_budget"):
        values_from_tree({"schema": 1, "tiling": {"memory_budget": "lots"}})


def test_a_new_file_never_takes_the_stem_of_an_earlier_scene(tmp_path) -> None:
    """A scene whose stem belongs to another, still existing file of an earlier run gets
    the suffix even alone; once that file is gone, the stem is free again.

    Teeth: name_outputs ignoring owners outside a collision: "a b.tif" takes "a_b".
    """
    (tmp_path / "a_b.tif").write_bytes(b"")
    (tmp_path / "a b.tif").write_bytes(b"")
    owners = {"a_b": str(tmp_path / "a_b.tif")}
    assert name_outputs([str(tmp_path / "a b.tif")], tmp_path, owners)[0].stem.startswith("a_b-")
    assert name_outputs([str(tmp_path / "a_b.tif")], tmp_path, owners)[0].stem == "a_b"
    (tmp_path / "a_b.tif").unlink()
    assert name_outputs([str(tmp_path / "a b.tif")], tmp_path, owners)[0].stem == "a_b"


@pytest.mark.parametrize("values, words", [
    ({"tile_size": 2_000_000_000}, "tiling.tile_size must be from 16"),
    ({"batch_size": 10**14}, "tiling.batch_size must be at most"),
    ({"threads_per_worker": 10**13}, "compute.threads_per_worker must be at most"),
])
def test_absurd_sizes_are_usage_errors(values, words) -> None:
    """Teeth: without the upper bounds the values reach torch and overflow there."""
    with pytest.raises(ConfigError, match=words):
        resolve(values)


def _bindable(host: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["999.1.1.1", "example.invalid", "10.255.255.1"])
def test_listen_addresses_this_machine_cannot_bind_are_refused(host: str) -> None:
    """Teeth: check_listen without its bind (resolution only): 10.255.255.1 passes."""
    if host == "10.255.255.1" and _bindable(host):
        pytest.skip("this machine has 10.255.255.1")
    with pytest.raises(ConfigError, match=f"compute.listen '{host}'"):
        check_listen(host)


def test_listen_says_whether_the_cluster_stays_on_the_loopback() -> None:
    """Teeth: check_listen returning True always: the 0.0.0.0 case fails."""
    assert check_listen("127.0.0.2") is True
    assert check_listen("0.0.0.0") is False
