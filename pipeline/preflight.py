"""Everything a run checks before it loads torch or starts a cluster.

Usage errors must answer at once, and a run must never destroy what it did not
make. So before the first import of torch, :func:`preflight`:

- checks the TLS files a ``tls://`` scheduler needs (:func:`pipeline.tls.check_tls`),
  or, for the embedded cluster, that this machine can bind ``compute.listen``
  (:func:`check_listen`);
- expands the scene arguments as users type them (:func:`expand_scenes`);
- reads the model spec, decides whether the code its architecture names may run
  (:func:`pipeline.architectures.resolve_architecture`: an import path needs
  ``--trust-spec-code``; nothing is imported here) and checks its weights file; an
  ONNX graph is loaded by ONNX Runtime (nothing runs) and its inputs and outputs
  checked against the spec's bands and classes (:func:`pipeline.networks.check_onnx`);
- checks that the output folder is, or can be made, a writable folder, without
  creating it (it is created only when a scene will run);
- names each scene's outputs, and refuses outputs that would replace an input
  scene (always) or a ``STEM.tif``/``STEM.zarr`` this tool did not make there
  (unless ``--overwrite``);
- refuses an output folder another run holds;
- reads each scene's header (size, dtype, georeference, bands): a bad scene fails
  alone, with one line; a scene of a format the run does not read (a VRT without
  ``--allow-vrt``, a PNG named ``.tif``...) is a usage error, and so is a header
  declaring more bands or pixels than the run allows (``input.max_bands``,
  ``input.max_pixels``), or windows that cannot fit the memory budget where it is
  known without torch (:mod:`pipeline.limits`).

No torch, no Dask: this module may import rasterio (through the readers), ONNX
Runtime (for an ONNX spec), YAML and the standard library only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.architectures import DEMO_ARCHITECTURE, Architecture, resolve_architecture
from pipeline.config import RunConfig
from pipeline.errors import (
    ConfigError,
    PipelineError,
    SceneError,
    SceneFormatError,
    SceneLimitError,
)
from pipeline.journal import (
    DIGESTS,
    LOCK,
    MANIFEST,
    PUBLISHED,
    SPEEDS,
    TRASH,
    WORK,
    WORKER_LOG,
    DigestCache,
    FileIdentity,
    SceneRecord,
    check_unlocked,
    fingerprint,
    read_json,
    stem_owners,
)
from pipeline.limits import HeaderLimits, check_window
from pipeline.modelspec import ONNX, ModelSpec, load_spec, read_weights, verify_weights
from pipeline.networks import check_onnx, check_precision
from pipeline.patterns import expand_scenes
from pipeline.plan import TILE_CANDIDATES, Outputs, name_outputs
from pipeline.readers import check_bands, open_scene
from pipeline.scene import SceneInfo, band_names_problem, nodata_problem
from pipeline.signals import check_signals
from pipeline.tls import check_tls, tls_files


@dataclass(frozen=True)
class SceneCheck:
    """One scene argument after the checks: its header, or why it cannot run."""

    path: str
    outputs: Outputs
    info: SceneInfo | None = None
    error: str | None = None
    #: sha256 of the scene file's bytes (the input part of its fingerprint); for a VRT,
    #: of its own digest and its sources'.
    digest: str | None = None
    #: The file's size, modification time and inode when it was hashed: tasks compare it
    #: with the file they read, so a scene changed during the run fails.
    identity: FileIdentity | None = None
    #: Every file hashed for ``digest``: (path, sha256, identity), the scene first.
    hashed: tuple[tuple[str, str, FileIdentity], ...] = ()


@dataclass(frozen=True)
class Preflight:
    """The outcome of :func:`preflight`: what the run will work on."""

    config: RunConfig
    out_dir: Path
    spec: ModelSpec
    weights_sha256: str
    scenes: tuple[SceneCheck, ...] = field(default_factory=tuple)
    #: Where the spec's network factory comes from (allowed for this run).
    architecture: Architecture | None = None
    #: Whether the embedded cluster would listen beyond the loopback (compute.listen).
    exposed: bool = False

    @property
    def runnable(self) -> list[SceneCheck]:
        return [s for s in self.scenes if s.info is not None]


def demo_caveat(checked: Preflight) -> str | None:
    """The one-line caveat for a run of the demo model (architecture ``demo-fcn``, trained
    on generated sample scenes only) over scenes that are not generated samples
    (:attr:`SceneInfo.sample`): their labels are illustrative. None for any other model,
    or when every runnable scene is a sample."""
    if checked.spec.architecture != DEMO_ARCHITECTURE:
        return None
    real = [c for c in checked.runnable if c.info is not None and not c.info.sample]
    if not real:
        return None
    first = Path(real[0].path).name
    which = first if len(real) == 1 else f"{first} and {len(real) - 1} more"
    return (f"the demo model was trained on generated sample scenes only: its labels for "
            f"{len(real)} scene(s) that are not samples ({which}) are illustrative, not a "
            "land-cover map; use a model trained for such imagery (--model SPEC)")


def _cause(path: Path) -> str:
    """Why ``path`` (an existing folder) cannot be written, in a few words."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_output_dir(out_dir: Path) -> None:
    """Check that ``out_dir`` is a writable folder, or can be created as one, without
    creating anything.

    Raises:
        ConfigError: one line naming the path and the cause (a file in the way, no
            permission, a read-only file system).
    """
    if out_dir.is_symlink() and not out_dir.exists():
        raise ConfigError(f"--out {out_dir}: it is a link to a missing folder "
                          f"({os.readlink(out_dir)})")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: it is a file, not a folder")
    if out_dir.is_dir():
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out_dir}: cannot write there ({_cause(out_dir)})")
        return
    parent = out_dir.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out_dir}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir}: cannot be created in {parent} ({_cause(parent)})")


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_inputs_kept(scenes: list[str], outputs: list[Outputs], out_dir: Path) -> None:
    """Refuse outputs that would replace or delete an input scene, whatever the options.

    Raises:
        ConfigError: one line naming the input and the output that would replace it.
    """
    inputs = {os.path.realpath(s): s for s in scenes}
    real_out = Path(os.path.realpath(out_dir))
    for out in outputs:
        for target in (out.cog, out.store):
            real = os.path.realpath(real_out / target.name)
            for real_input, scene in inputs.items():
                inside = real_input == real or real_input.startswith(real + os.sep)
                if inside or _same_file(scene, target):
                    raise ConfigError(
                        f"the output {target} would replace the input scene {scene}; "
                        "choose another --out (inputs are never overwritten)")
    for real_input, scene in inputs.items():
        if real_input.startswith(str(real_out / ".fcn-pipeline") + os.sep):
            raise ConfigError(f"the input scene {scene} lies inside {out_dir}/.fcn-pipeline, "
                              "the journal of that output folder; move it out first")


def check_foreign_outputs(scenes: list[str], outputs: list[Outputs], out_dir: Path,
                          overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, outputs that would replace a ``STEM.tif`` or
    ``STEM.zarr`` which this tool did not make in ``out_dir`` (its journal has no record
    that matches them).

    Raises:
        ConfigError: one line naming the scene and the file it would replace.
    """
    if overwrite or not out_dir.is_dir():
        return
    for scene, out in zip(scenes, outputs):
        foreign = SceneRecord(out_dir, out.stem).foreign_outputs()
        if foreign:
            raise ConfigError(
                f"the outputs of {scene} would replace {foreign[0]}, which fcn-pipeline did "
                "not make there (or which changed since it was published); move it away, "
                "choose another --out, or pass --overwrite to replace it")


def check_journal(out_dir: Path, stems: list[str]) -> None:
    """Refuse an output folder whose journal (``.fcn-pipeline/``), manifest or the journal
    entries this run would use are not what this tool makes: links (which it would
    follow out of the folder, deleting or truncating what they point at), or a file
    where a folder belongs; and a ``run.json`` that is not an fcn-pipeline manifest.

    Raises:
        ConfigError: one line naming the path and what to do.
    """
    work = out_dir / WORK
    entries = [work, work / LOCK, work / PUBLISHED, work / TRASH, work / DIGESTS, work / SPEEDS,
               work / WORKER_LOG, out_dir / MANIFEST]
    entries += [work / stem for stem in stems]
    entries += [work / PUBLISHED / f"{stem}.json" for stem in stems]
    for path in entries:
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link: fcn-pipeline never follows links in "
                              "its journal or manifest; remove the link or choose another --out")
    for folder in (work, work / PUBLISHED, work / TRASH, *(work / s for s in stems)):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file where fcn-pipeline keeps a folder; move it "
                              "away or choose another --out")
    manifest = out_dir / MANIFEST
    if manifest.exists():
        data = read_json(manifest) if manifest.is_file() else None
        if not (isinstance(data, dict) and "fcn_pipeline" in data):
            raise ConfigError(f"{manifest} is not an fcn-pipeline manifest, and a run would "
                              "replace it; move it away or choose another --out")


def _regular_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a scene before any reader opens it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # the reader says "no such file" and the like
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    kind = "a named pipe" if stat.S_ISFIFO(mode) else "not a regular file"
    return f"{Path(path).name} is {kind} ({path}); pass a GeoTIFF file"


def load_model_spec(config: RunConfig) -> tuple[ModelSpec, str, Architecture | None]:
    """The run's model spec, the sha256 of its weights (checked against the spec's) and
    where its network factory comes from (None for an ONNX graph, checked here against
    the spec by :func:`check_onnx_spec`); nothing the spec names is imported.

    Raises:
        ModelSpecError: the spec or its weights are bad; its architecture is unknown, or
            an import path the run does not trust (``config.trust_spec_code``), or leads
            into the standard library.
        ModelError: as :func:`check_onnx_spec`.
    """
    spec = load_spec(config.model)
    if spec.backend == ONNX:
        return spec, check_onnx_spec(spec, config), None
    architecture = resolve_architecture(spec, trust_code=config.trust_spec_code)
    return spec, verify_weights(spec), architecture


def check_onnx_spec(spec: ModelSpec, config: RunConfig) -> str:
    """Check an ONNX spec before the run: its graph loads in ONNX Runtime and takes the
    spec's bands and gives its classes, and the run's precision suits it; return the
    sha256 of its weights.

    Raises:
        ModelSpecError: the weights are missing or do not match the spec's sha256.
        ModelError: ONNX Runtime is not installed or cannot load the graph; the graph's
            inputs, outputs, channels or classes do not fit the spec
            (:func:`pipeline.networks.check_onnx`).
            ``compute.precision`` is not fp32 (:func:`pipeline.networks.check_precision`).
    """
    digest = verify_weights(spec)
    check_precision(spec, config.precision)
    data = read_weights(spec)
    check_onnx(spec, data)
    return digest


def check_scene(path: str, outputs: Outputs, spec: ModelSpec, allow_no_crs: bool,
                allow_vrt: bool = False, limits: HeaderLimits | None = None) -> SceneCheck:
    """A scene's header, checked against the model spec; errors become the scene's
    one line, never an exception, except a format the run does not read or a header
    beyond ``limits``.

    Raises:
        ConfigError: the scene, or a file it would make GDAL read, is of a format the
            run does not read (:class:`~pipeline.errors.SceneFormatError`).
        SceneLimitError: the header declares more bands or pixels than ``limits``.
    """
    problem = _regular_file_problem(path)
    if problem:
        return SceneCheck(path, outputs, error=problem)
    try:
        info = open_scene(path, allow_no_crs=allow_no_crs, allow_vrt=allow_vrt, limits=limits)
        check_bands(info, spec.bands, spec.dtypes)
        if spec.band_names is not None:
            problem = band_names_problem(info, spec.bands, spec.band_names, spec.source)
            if problem:
                raise SceneError(problem)
        if not isinstance(spec.nodata_input, str):
            problem = nodata_problem(float(spec.nodata_input), info.dtype)
            if problem:
                raise SceneError(f"{Path(path).name}: nodata.input of {spec.source}: {problem}; "
                                 "set nodata.input to a value the scene's pixels can hold, or "
                                 "to scene or none")
    except SceneFormatError as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    except SceneLimitError:
        raise
    except PipelineError as exc:
        return SceneCheck(path, outputs, error=str(exc).strip().splitlines()[0])
    return SceneCheck(path, outputs, info=info)


def check_listen(host: str) -> bool:
    """Check that this machine can bind the embedded cluster to ``host`` (compute.listen).

    Resolves ``host`` and binds a TCP socket to each of its addresses on a free port,
    closing it at once, as the cluster's scheduler, dashboard and workers will bind.

    Returns:
        Whether every address of ``host`` is a loopback address (127.0.0.0/8, ::1).

    Raises:
        ConfigError: ``host`` does not resolve, or an address of it is not one of this
            machine's (or binding it is refused).
    """
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"compute.listen {host!r} does not resolve ({cause}); give an "
                          "address of this machine, such as 127.0.0.1, or 0.0.0.0 for all "
                          "of its interfaces") from None
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"compute.listen {host!r}: cannot listen on {address[0]} "
                              f"({exc.strerror or exc}); give an address of this machine, "
                              "such as 127.0.0.1, or 0.0.0.0 for all of its interfaces"
                              ) from None
    return all(ipaddress.ip_address(address[0]).is_loopback for *_, address in found)


def output_dir(config: RunConfig) -> Path:
    if not config.output:
        raise ConfigError("no output directory: pass --out DIR or set output in a workflow")
    return Path(config.output).expanduser().absolute()


def preflight(config: RunConfig, *, digests: bool = True) -> Preflight:
    """Check a run before loading torch or starting a cluster (see the module docstring).

    Args:
        config: The resolved run configuration.
        digests: Also compute each readable scene's content digest (its fingerprint's
            input part), reusing the output folder's cache of them.

    Returns:
        The checked scenes: each with its header and outputs, or its one-line error.

    Raises:
        ConfigError, ModelSpecError: a usage error (one line): TLS settings that do not
            suit the scheduler address or files that cannot serve, no scenes, a pattern
            that matched nothing, a bad spec or weights file, an output folder that is
            not writable, outputs that would replace an input scene or a file this tool
            did not make (without ``--overwrite``), another run holding the folder.
        SceneLimitError: a scene declares more bands or pixels than the run allows, or
            its windows need more than a memory budget known without torch.
    """
    address = config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    check_tls(address, tls_files(config.tls_ca_file, config.tls_cert, config.tls_key))
    exposed = not address and not check_listen(config.listen)
    out_dir = output_dir(config)
    paths = expand_scenes(config.scenes, out_dir)
    spec, weights_sha256, architecture = load_model_spec(config)
    check_output_dir(out_dir)
    owners = stem_owners(out_dir) if out_dir.is_dir() else {}
    outputs = name_outputs(paths, out_dir, owners)
    if out_dir.is_dir():
        check_journal(out_dir, [o.stem for o in outputs])
        check_unlocked(out_dir)
    check_inputs_kept(paths, outputs, out_dir)
    check_foreign_outputs(paths, outputs, out_dir, config.overwrite)
    checks = []
    limits = HeaderLimits.of(config)
    for path, out in zip(paths, outputs):
        check = check_scene(path, out, spec, config.allow_no_crs, config.allow_vrt, limits)
        if check.info is not None:
            check_window(check.info, len(spec.bands), len(spec.classes), config,
                         config.tile_size or TILE_CANDIDATES[0])
        checks.append(check)
        check_signals()  # a signal a C library swallowed while a header was read
    if digests:
        cache = DigestCache(out_dir if out_dir.is_dir() else None)
        checks = [_with_digest(c, cache) for c in checks]
        check_signals()
    return Preflight(config, out_dir, spec, weights_sha256, tuple(checks), architecture,
                     exposed)


def _with_digest(check: SceneCheck, cache: DigestCache) -> SceneCheck:
    if check.info is None:
        return check
    try:
        hashed = tuple((path, *cache.digest(path))
                       for path in (check.info.path, *check.info.sources))
    except OSError as exc:
        return SceneCheck(check.path, check.outputs,
                          error=f"{Path(check.path).name} cannot be read: {exc.strerror or exc}")
    _, digest, identity = hashed[0]
    if check.info.sources:  # a VRT's labels change with its sources' pixels
        digest = fingerprint({"vrt": digest, "sources": [d for _, d, _ in hashed[1:]]})
    return SceneCheck(check.path, check.outputs, check.info, None, digest, identity, hashed)


def save_digests(checked: Preflight) -> None:
    """Keep the scenes' content digests in the output folder for the next run."""
    cache = DigestCache(checked.out_dir)
    for check in checked.runnable:
        for path, digest, identity in check.hashed:
            cache.remember(path, digest, identity)
    cache.save()
