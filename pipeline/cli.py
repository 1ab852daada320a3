"""The ``fcn-pipeline`` command: parse, call one function, show the result.

Exit codes: 0 success; 1 some scene failed (the others completed) or an output
could not be written; 2 usage errors (bad options, settings, model spec, paths,
outputs that would replace files this tool did not make); 130 and 143 when stopped
by SIGINT or SIGTERM (scenes recorded as interrupted; the same command resumes).

Heavy imports (torch, Dask) happen inside the commands that need them, after
everything that can be checked without them: a usage error answers at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from pipeline._version import __version__
from pipeline.errors import (
    ConfigError,
    GeometryError,
    ModelAnalysisError,
    ModelError,
    OutputError,
    PipelineError,
)
from pipeline.signals import Interrupted, stop_on_signals

TILE_SIZES = (512, 1024, 2048)
EXIT_FAILED, EXIT_USAGE = 1, 2
TRUST_HELP = ("This spec runs code: let the model spec's architecture be an import path "
              "package.module:factory, imported and called here and on every worker. Full "
              "code execution, like running a Python script from the spec's author: only for "
              "specs you trust (refusing the standard library catches mistakes; it is not a "
              "sandbox).")


class _Cli(click.Group):
    """The command group: every error is one line (click's own usage errors too), and
    SIGINT and SIGTERM stop any command with one line and exit status 128 + N."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        with stop_on_signals():
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False,
                                    **extra)
            except Interrupted as exc:
                click.echo(f"fcn-pipeline: interrupted by {exc.name}", err=True)
                sys.exit(exc.exit_code)
            except click.ClickException as exc:
                if isinstance(exc, click.UsageError) and not isinstance(exc, _UsageError) \
                        and exc.ctx is not None:
                    where = f" (see {exc.ctx.command_path} --help)"
                else:
                    where = ""
                click.echo(f"error: {exc.format_message()}{where}", err=True)
                sys.exit(exc.exit_code)
            except click.Abort:
                click.echo("fcn-pipeline: aborted", err=True)
                sys.exit(EXIT_FAILED)
            except OSError as exc:  # a file error no command named, or printing failed
                with contextlib.suppress(OSError):
                    where = f" ({exc.filename})" if exc.filename else ""
                    click.echo(f"error: {exc.strerror or exc}{where}", err=True)
                sys.exit(EXIT_FAILED)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


class _UsageError(click.UsageError):
    """A usage error from our own validation (exit code 2), shown without a --help hint."""


def _fail_usage(exc: Exception) -> NoReturn:
    raise _UsageError(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {_one_line(exc)}", err=True)
    sys.exit(EXIT_FAILED)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fcn-pipeline")
def main() -> None:
    """Exact tiled inference of fully convolutional networks over large scenes.

    Exit codes: 0 success, 1 some scene failed or an output could not be written,
    2 usage error, 130/143 stopped by SIGINT/SIGTERM (rerun the command to resume).
    """


@main.command()
@click.argument("models", nargs=-1)
@click.option("--tile-sizes", default=",".join(map(str, TILE_SIZES)), show_default=True,
              help="Comma-separated tile sizes for the overhead and memory figures.")
@click.option("--halo", help="Declared halo in px, N or ROWS,COLS, for model specs (as run "
              "--halo; over the spec's halo): what a model with global context would run with.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--trust-spec-code", is_flag=True, help=TRUST_HELP)
def inspect(models: tuple[str, ...], tile_sizes: str, halo: str | None, as_json: bool,
            trust_spec_code: bool) -> None:
    """Back end, input and output shapes, receptive field, halo, overhead and memory per
    tile size of built-in architectures or model specs, analysed as run analyses them.

    MODELS are built-in names (all of them when none is given), model spec files
    (YAML, or STAC Items with the MLM extension), or demo. A model with global context
    and no declared halo is reported (exit 0) with the analysis's reason.
    """
    from pipeline.config import MAX_TILE, parse_halo

    try:
        sizes = tuple(int(s) for s in tile_sizes.split(",") if s.strip())
        if not sizes or not all(16 <= size <= MAX_TILE for size in sizes):
            raise ConfigError(f"--tile-sizes must be sizes from 16 to {MAX_TILE} px, got "
                              f"{tile_sizes!r}")
        declared = parse_halo(halo, "--halo") if halo else None
    except PipelineError as exc:
        _fail_usage(exc)
    except ValueError as exc:
        _fail_usage(ConfigError(f"--tile-sizes must be comma-separated numbers of pixels "
                                f"({exc})"))
    from pipeline.inspection import inspect_rows, render_table, rows_as_json

    try:
        rows = inspect_rows(models, sizes, trust_code=trust_spec_code, halo=declared)
    except PipelineError as exc:
        _fail_usage(exc)
    click.echo(json.dumps(rows_as_json(rows, sizes), indent=2) if as_json
               else render_table(rows, sizes))


@main.command("sample-scenes")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=2048, show_default=True, help="Pixels per side (up to 30000).")
@click.option("--count", default=2, show_default=True, help="Number of scenes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first scene.")
def sample_scenes(directory: Path, size: int, count: int, seed: int) -> None:
    """Write generated georeferenced scenes and their true label rasters to DIRECTORY."""
    from pipeline.samples import write_sample_scenes

    try:
        written = write_sample_scenes(directory, size=size, count=count, seed=seed)
    except ConfigError as exc:
        _fail_usage(exc)
    except OSError as exc:
        _fail(exc)
    for sample in written:
        click.echo(f"{sample.scene}  (true labels: {sample.labels})")


def _progress_printer(stream: IO[str] = sys.stderr) -> Callable[[Any], None]:
    tty = stream.isatty()
    last = [0.0]

    def show(event: Any) -> None:
        rate = event.pixels_done / 1e6 / event.elapsed if event.elapsed else 0.0
        text = (f"tiles {event.tiles_done}/{event.tiles_total} "
                f"({100 * event.tiles_done / max(1, event.tiles_total):.0f}%)  "
                f"{rate:.1f} Mpx/s  {event.elapsed:.0f} s")
        now = time.monotonic()
        finished = event.tiles_done >= event.tiles_total
        if tty:
            stream.write("\r" + text + ("\n" if finished else ""))
            stream.flush()
        elif finished or now - last[0] >= 5:
            stream.write(text + "\n")
            stream.flush()
            last[0] = now

    return show


@main.command()
@click.argument("scenes", nargs=-1)
@click.option("--out", "output", help="Output folder (created when a scene runs).")
@click.option("--model", help="Model spec file (YAML, or a STAC Item with the MLM "
              "extension), or demo (the default).")
@click.option("--trust-spec-code", is_flag=True, default=None, help=TRUST_HELP)
@click.option("--workflow", type=click.Path(dir_okay=False),
              help="Workflow file (settings: file < FCN_PIPELINE_* environment < options).")
@click.option("--date",
              help="Run date for {date} in the workflow, YYYY-MM-DD (default: today, UTC).")
@click.option("--tile-size", help="Core tile size in pixels, or auto (default): the best "
              "estimated throughput within --memory-budget.")
@click.option("--memory-budget", help="Memory one inference task may use, e.g. 2GiB (default: "
              "60 percent of the GPU, or of the RAM shared between workers).")
@click.option("--batch-size", type=int, help="Tiles per task and per forward pass (default 1).")
@click.option("--halo", help="Declared halo in px, N or ROWS,COLS (default auto: derived from "
              "the receptive field, else the spec's halo): lets a model with global context "
              "run, its deviation from one-window prediction measured and reported.")
@click.option("--stitch", type=click.Choice(["crop", "blend"]),
              help="How tiles are joined: crop each window to its tile (default; exact with "
                   "the derived halo) or blend overlapping windows with weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Default auto.")
@click.option("--scheduler", help="Dask scheduler address (else DASK_SCHEDULER_ADDRESS, else an "
              "embedded cluster); tls://HOST:PORT with the --tls-* files.")
@click.option("--tls-ca-file", help="PEM file of the CA that signed a tls:// scheduler's "
              "certificate.")
@click.option("--tls-cert", help="PEM certificate this client shows a tls:// scheduler.")
@click.option("--tls-key", help="PEM private key of --tls-cert (unless that file holds it).")
@click.option("--listen", help="Interface the embedded cluster binds to (default 127.0.0.1; "
              "another lets other hosts view its read-only dashboard and load it; running "
              "code needs this run's temporary TLS credentials).")
@click.option("--cluster", type=click.Choice(["kubernetes"]),
              help="Create an ephemeral Dask cluster for this run "
                   "(needs fcn-pipeline[kubernetes]).")
@click.option("--cluster-spec", type=click.Path(dir_okay=False),
              help="DaskCluster YAML for --cluster kubernetes.")
@click.option("--workers", type=int,
              help="Workers of the embedded cluster (default: one per core).")
@click.option("--threads-per-worker", type=int,
              help="Threads per worker, also torch's (default 1).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Autocast precision of the forward pass (default fp32).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last memory format (default: on with cuda).")
@click.option("--compile/--no-compile", "compile_model", default=None,
              help="torch.compile the model once per worker.")
@click.option("--gpu-resource/--no-gpu-resource", default=None,
              help="Inference tasks ask for the Dask resource GPU=1 "
                   "(default: when --device is cuda).")
@click.option("--probabilities/--no-probabilities", default=None,
              help="Also store per-class float16 scores.")
@click.option("--allow-no-crs", is_flag=True, default=None, help="Process scenes without a CRS.")
@click.option("--allow-vrt", is_flag=True, default=None,
              help="Also read VRT scenes whose sources are local GeoTIFFs (or such VRTs).")
@click.option("--max-bands", type=int, help="Refuse scenes with more bands (default 1024).")
@click.option("--max-pixels", help="Refuse scenes with more pixels, e.g. 2e11 (default 1e11).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Start every scene from nothing and replace its outputs once the new ones "
              "are published, also outputs made otherwise (never an input scene).")
@click.option("--dry-run", is_flag=True, help="Print the plan and what each scene would need "
              "(skip, resume, start, refusal); compute and write nothing; exit as the run would.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan (with --dry-run) or the outcome as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Also print what is decided for each scene.")
def run(scenes: tuple[str, ...], output: str | None, model: str | None,
        trust_spec_code: bool | None, workflow: str | None,
        date: str | None, tile_size: str | None, memory_budget: str | None,
        batch_size: int | None, halo: str | None, stitch: str | None, device: str | None,
        scheduler: str | None, tls_ca_file: str | None, tls_cert: str | None,
        tls_key: str | None, listen: str | None, cluster: str | None, cluster_spec: str | None,
        workers: int | None, threads_per_worker: int | None, precision: str | None,
        channels_last: bool | None, compile_model: bool | None, gpu_resource: bool | None,
        probabilities: bool | None, allow_no_crs: bool | None, allow_vrt: bool | None,
        max_bands: int | None, max_pixels: str | None, overwrite: bool | None,
        dry_run: bool, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Label SCENES (GeoTIFF files, or glob patterns for names that are not files) into
    a Zarr store and a COG each in --out."""
    from contextlib import ExitStack

    from pipeline.config import parse_bytes, parse_count, parse_halo, resolve, values_from_env
    from pipeline.preflight import demo_caveat, preflight
    from pipeline.workflow import load_workflow

    if quiet and verbose:
        _fail_usage(ConfigError("-q/--quiet and -v/--verbose exclude each other"))
    say: Callable[[str], None] = (
        (lambda m: click.echo(m, err=True)) if verbose else (lambda m: None)
    )
    try:
        if date is not None and workflow is None:
            raise ConfigError("--date fills {date} in a workflow file: pass --workflow FILE too")
        if (cluster is None) != (cluster_spec is None):
            raise ConfigError("--cluster kubernetes and --cluster-spec FILE go together")
        settings = load_workflow(workflow, date=date) if workflow else {}
        config = resolve(settings, values_from_env(), {
            "scenes": tuple(scenes) or None, "output": output, "model": model,
            "trust_spec_code": trust_spec_code,
            "tile_size": _tile_size(tile_size), "batch_size": batch_size, "device": device,
            "halo": parse_halo(halo, "--halo") if halo is not None else None,
            "stitch": stitch,
            "memory_budget": parse_bytes(memory_budget) if memory_budget else None,
            "scheduler": scheduler, "tls_ca_file": tls_ca_file, "tls_cert": tls_cert,
            "tls_key": tls_key, "listen": listen,
            "workers": workers, "threads_per_worker": threads_per_worker,
            "probabilities": probabilities, "allow_no_crs": allow_no_crs, "allow_vrt": allow_vrt,
            "overwrite": overwrite,
            "max_bands": max_bands, "max_pixels": parse_count(max_pixels, "--max-pixels")
            if max_pixels else None,
            "gpu_resource": gpu_resource, "precision": precision,
            "channels_last": channels_last, "compile": compile_model,
        })
        kube_spec = _cluster_spec(config, cluster_spec) if cluster_spec else None
        checked = preflight(config)  # before loading torch or starting a cluster
        if checked.architecture and checked.architecture.note and not quiet:
            click.echo(f"warning: {checked.architecture.note}", err=True)
        if checked.exposed and kube_spec is None and not dry_run and not quiet:
            click.echo(f"warning: the embedded cluster listens on {config.listen} "
                       "(compute.listen): anyone who reaches it can view its dashboard (plain "
                       "HTTP, read-only) and load its scheduler and workers, which run code "
                       "only for holders of this run's temporary TLS credentials", err=True)
        _check_scheduler(config, reach=not dry_run)
        if not checked.runnable:  # every scene failed its checks: no torch needed to say so
            from pipeline.report import failed_report

            _show_report(failed_report([(c.path, c.outputs.stem, c.error) for c in checked.scenes],
                                       "no scene can run"), dry_run, as_json, quiet)
        from pipeline.run import run as run_scenes

        with ExitStack() as stack:
            if kube_spec is not None:
                config = _kubernetes(stack, config, kube_spec, dry_run)
            report = run_scenes(
                config, dry_run=dry_run, checked=checked, log=say,
                on_progress=None if quiet or as_json else _progress_printer(),
                on_dashboard=None if quiet else
                (lambda link: click.echo(f"Dask dashboard: {link}", err=True)),
            )
    except (ConfigError, ModelError, ModelAnalysisError, GeometryError) as exc:
        _fail_usage(exc)
    except OutputError as exc:
        _fail(exc)
    _show_report(report, dry_run, as_json, quiet, bool(config.overwrite), demo_caveat(checked))


def _show_report(report: Any, dry_run: bool, as_json: bool, quiet: bool,
                 overwrite: bool = False, caveat: str | None = None) -> NoReturn:
    """Print a run's outcome and exit with its code; ``caveat`` (a warning about the
    labels, once per run) goes to stderr when the run labelled scenes."""
    failed = [s for s in report.scenes if s.status == "failed"]
    if caveat and not (quiet or dry_run or report.refusal):
        click.echo(f"warning: {caveat}", err=True)
    if as_json:
        from dataclasses import asdict

        payload = report.plan if dry_run else {
            "manifest": str(report.manifest) if report.manifest else None,
            "interrupted": report.interrupted, "scenes": [asdict(s) for s in report.scenes]}
        click.echo(json.dumps(payload, indent=2, default=str))
    elif not quiet and not report.interrupted:
        click.echo(report.plan_text if dry_run else _summary(report))
        if not dry_run and report.manifest and not report.manifest_error:
            click.echo(f"outputs in {report.manifest.parent} (manifest {report.manifest.name})")
    for scene in failed:
        name, error = Path(scene.scene).name, str(scene.error)
        click.echo(f"error: {error if error.startswith(name) else f'{name}: {error}'}", err=True)
    if report.refusal:
        click.echo(f"error: {report.refusal}", err=True)
        sys.exit(EXIT_USAGE)
    if report.manifest_error:
        click.echo(f"error: {report.manifest_error}", err=True)
    if report.interrupted:
        import signal

        name = signal.Signals(report.interrupted).name
        left = sum(s.status == "interrupted" for s in report.scenes)
        again = "start them again (--overwrite always starts from nothing)" if overwrite \
            else "resume"
        click.echo(f"fcn-pipeline: interrupted by {name}: {left} scene(s) recorded as "
                   f"interrupted; run the same command again to {again}", err=True)
        sys.exit(128 + report.interrupted)
    sys.exit(EXIT_FAILED if failed or report.manifest_error else 0)


def _check_scheduler(config: Any, *, reach: bool) -> None:
    """Check the scheduler address (option, workflow or DASK_SCHEDULER_ADDRESS) before
    torch is loaded and anything is written: its form, and with ``reach`` that a Dask
    scheduler answers there, over TLS with the --tls-* files (bounded:
    :data:`pipeline.cluster.CONNECT_TIMEOUT` and :data:`pipeline.cluster.ANSWER_TIMEOUT`)."""
    address = config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if not address:
        return
    from pipeline.cluster import ClusterSpec, check_address, check_scheduler
    from pipeline.tls import tls_files

    check_address(address)
    if reach:
        tls = tls_files(config.tls_ca_file, config.tls_cert, config.tls_key)
        check_scheduler(address, ClusterSpec(address, tls=tls).security())


def _tile_size(text: str | None) -> int | None:
    """``--tile-size`` as an int; ``auto`` (or nothing) leaves the choice to the planner."""
    if text is None or text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit():
        raise ConfigError(f"--tile-size must be a number of pixels or auto, got {text!r}")
    return int(text)


def _cluster_spec(config: Any, path: str) -> dict[str, Any]:
    """The checked ``--cluster-spec`` file, read before torch loads (a usage error)."""
    from pipeline.kube import load_cluster_spec

    if config.scheduler:
        raise ConfigError("--cluster kubernetes starts its own scheduler: drop --scheduler "
                          "(or compute.scheduler)")
    return load_cluster_spec(path, gpu=True if config.device == "cuda" else None)


def _kubernetes(stack, config, spec, dry_run: bool):  # type: ignore[no-untyped-def]
    """Start an ephemeral DaskCluster (shut down with ``stack``); point the run at it."""
    from pipeline.kube import kube_cluster

    if dry_run:
        return config
    kube = stack.enter_context(kube_cluster(spec))
    return config.with_overrides(scheduler=kube.scheduler_address)


@main.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--date", help="Run date for {date}, YYYY-MM-DD (default: today in UTC).")
@click.option("--trust-spec-code", is_flag=True, default=None, help=TRUST_HELP)
def validate(workflow: str, date: str | None, trust_spec_code: bool | None) -> None:
    """Check a WORKFLOW file with the FCN_PIPELINE_* environment, as run would: the
    settings, the scenes it names (they exist, their headers suit the model), the model
    spec and weights, the output folder and what it holds, the scheduler address. Print
    the configuration it gives, defaults filled in."""
    import yaml

    from pipeline.config import resolve, values_from_env
    from pipeline.preflight import preflight
    from pipeline.workflow import load_workflow, validate_workflow

    try:
        validate_workflow(workflow, date=date)  # errors that name the file's line
        config = resolve(load_workflow(workflow, date=date), values_from_env(),
                         {"trust_spec_code": trust_spec_code})
        checked = preflight(config, digests=False)
        if checked.architecture and checked.architecture.note:
            click.echo(f"warning: {checked.architecture.note}", err=True)
        failed = [c for c in checked.scenes if c.error]
        if failed:
            raise ConfigError(f"{failed[0].error}"
                              + (f" (and {len(failed) - 1} more scenes fail)"
                                 if len(failed) > 1 else ""))
        _check_scheduler(config, reach=False)
    except PipelineError as exc:
        _fail_usage(exc)
    click.echo(yaml.safe_dump(config.to_tree(), sort_keys=False), nl=False)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def verify(directory: Path, as_json: bool) -> None:
    """Check the published outputs in DIRECTORY against the checksums its manifest and
    journal recorded; exit 1 and name every damaged file."""
    from pipeline.verification import verify_outputs

    try:
        findings = verify_outputs(directory)
    except ConfigError as exc:
        _fail_usage(exc)
    damaged = [f for f in findings if not f.ok]
    if as_json:
        click.echo(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        for finding in findings:
            click.echo(f"{'ok     ' if finding.ok else 'DAMAGED'}  {finding.path}"
                       + (f": {finding.problem}" if finding.problem else ""))
    if damaged:
        click.echo(f"error: {len(damaged)} damaged output file(s) in {directory}", err=True)
    sys.exit(EXIT_FAILED if damaged else 0)


@main.command("bench-memory")
@click.option("--sizes", default="2048,8192,20000", show_default=True,
              help="Comma-separated scene sizes (pixels per side).")
@click.option("--tile-size", type=int, help="Tile size for the runs (default: run's default).")
@click.option("--workers", type=int, help="Workers of the embedded cluster.")
@click.option("--model", default="demo", show_default=True, help="Model spec or demo.")
@click.option("--trust-spec-code", is_flag=True, help=TRUST_HELP)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the temporary scenes go (default: the system's temporary folder).")
def bench_memory(sizes: str, tile_size: int | None, workers: int | None, model: str,
                 trust_spec_code: bool, workdir: Path | None) -> None:
    """Peak memory of the whole process tree and Mpx/s of run on generated scenes."""
    from pipeline.benchmark import memory_benchmark, render_memory

    try:
        values = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError as exc:
        _fail_usage(exc)
    figures = memory_benchmark(values, tile_size=tile_size, workers=workers, model=model,
                               trust_code=trust_spec_code,
                               workdir=workdir, log=lambda m: click.echo(m, err=True))
    click.echo(render_memory(figures))
    sys.exit(1 if any(f.exit_code for f in figures) else 0)


@main.command("bench-planning")
@click.option("--tiles", default="1000,100000", show_default=True,
              help="Comma-separated numbers of tiles of the scenes.")
@click.option("--tile-size", default=16, show_default=True, help="Tile size in pixels.")
@click.option("--workers", default=2, show_default=True, help="Workers of the embedded cluster.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the temporary scenes go (default: the system's temporary folder).")
def bench_planning(tiles: str, tile_size: int, workers: int, workdir: Path | None) -> None:
    """Peak memory of the runner (client and embedded scheduler) planning scenes of so many
    tiles and following their tasks, which do no work, to the end."""
    from pipeline.benchmark import planning_benchmark, render_planning

    try:
        counts = tuple(int(s) for s in tiles.split(",") if s.strip())
        if not counts or min(counts) < 1:
            raise ValueError(f"got {tiles!r}")
    except ValueError as exc:
        _fail_usage(ConfigError(f"--tiles must be comma-separated numbers of tiles ({exc})"))
    figures = planning_benchmark(counts, tile_size=tile_size, workers=workers, workdir=workdir,
                                 log=lambda m: click.echo(m, err=True))
    click.echo(render_planning(figures))


@main.command()
@click.option("--model", default="demo", show_default=True,
              help="demo, a model spec file, or a built-in architecture name (random weights).")
@click.option("--size", default=2048, show_default=True, help="Side of the generated scene (px).")
@click.option("--tile-size", type=int, help="Tile size of (b), (c), (d) (default: what run picks).")
@click.option("--workers", type=int,
              help="Workers of the run (default: --threads on cpu, 1 on cuda).")
@click.option("--threads", type=int, help="torch and ONNX Runtime threads, and workers x "
              "threads of the run (default: the usable cores).")
@click.option("--repeats", default=3, show_default=True, help="Timed passes of (a), (b), (d).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--trust-spec-code", is_flag=True, help=TRUST_HELP)
@click.option("--argument", "arguments", multiple=True, metavar="KEY=YAML",
              help="Factory argument of a built-in architecture, e.g. base=4 (repeatable).")
@click.option("--skip-run", is_flag=True, help="Leave out (c), the end-to-end run.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the temporary scene, spec and outputs go.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--scaling", help="Instead: end-to-end runs with these worker counts (e.g. 1,2) "
              "and their parallel efficiency.")
def bench(model: str, size: int, tile_size: int | None, workers: int | None,
          threads: int | None, repeats: int, device: str, trust_spec_code: bool,
          arguments: tuple[str, ...],
          skip_run: bool, workdir: Path | None, as_json: bool, scaling: str | None) -> None:
    """Throughput of (a) the bare model, (b) exact tiling in memory, (c) run end to end and
    (d) 25 percent overlap sliding windows, on one generated scene, with their ratios; and
    ONNX Runtime against PyTorch on the same network (a torch one exported to ONNX)."""
    try:
        kwargs = _factory_arguments(arguments)  # before torch loads: a usage error is quick
    except ConfigError as exc:
        _fail_usage(exc)
    from pipeline.throughput import (
        render_scaling,
        render_throughput,
        scaling_benchmark,
        throughput_benchmark,
    )

    if scaling:
        try:
            counts = [int(v) for v in scaling.split(",") if v.strip()]
            rows = scaling_benchmark(model, size=size, workers=counts, tile_size=tile_size,
                                     trust_code=trust_spec_code, workdir=workdir,
                                     log=lambda m: click.echo(m, err=True))
        except (ValueError, ModelError) as exc:
            _fail_usage(exc)
        click.echo(json.dumps(rows, indent=2) if as_json else render_scaling(rows, size))
        sys.exit(1 if any(r["exit_code"] for r in rows) else 0)
    try:
        result = throughput_benchmark(
            model, size=size, tile_size=tile_size, workers=workers, threads=threads,
            repeats=repeats, device=device, arguments=kwargs or None, end_to_end=not skip_run,
            trust_code=trust_spec_code,
            workdir=workdir, log=lambda m: click.echo(m, err=True))
    except (ConfigError, ModelError) as exc:
        _fail_usage(exc)
    click.echo(json.dumps(result, indent=2) if as_json else render_throughput(result))
    outcome = result["run"]
    sys.exit(1 if outcome and outcome["exit_code"] else 0)


def _factory_arguments(arguments: Sequence[str]) -> dict[str, Any]:
    """``bench --argument KEY=YAML`` values by key; ConfigError (one line) for one
    without ``=``, a key or a value, or whose value is refused YAML."""
    from pipeline.yaml_input import parse_yaml

    kwargs = {}
    for item in arguments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--argument must be KEY=VALUE, got {item!r}")
        if not value.strip():  # YAML would read it as null, which no factory takes
            raise ConfigError(f"--argument {key.strip()} has no value; give one, e.g. "
                              f"{key.strip()}=4")
        kwargs[key.strip()] = parse_yaml(value, source=f"--argument {key.strip()}",
                                         what="value").data
    return kwargs


@main.group()
def demo() -> None:
    """The bundled demo model: re-train it, measure its accuracy and speed."""


@demo.command("train")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for demo.safetensors and demo.yaml (the packaged ones: pipeline/data).")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=1500, show_default=True)
@click.option("--threads", default=2, show_default=True,
              help="torch threads (results depend on it).")
def demo_train(out: Path, seed: int, steps: int, threads: int) -> None:
    """Train the demo patch classifier on generated scenes and write the FCN's weights and spec."""
    from pipeline.demo import train_demo

    out.mkdir(parents=True, exist_ok=True)
    result = train_demo(out, seed=seed, steps=steps, threads=threads,
                        log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {result['weights']} (sha256 {result['sha256']}) and {result['spec']} "
               f"in {result['seconds']:.0f} s")


@demo.command("evaluate")
@click.option("--model", default="demo", show_default=True,
              help="Spec of a demo-architecture model.")
@click.option("--size", default=1024, show_default=True, help="Pixels per side of each scene.")
@click.option("--seeds", default="9000,9001,9002,9003", show_default=True,
              help="Held-out scene seeds (training uses 1000 and up).")
@click.option("--trust-spec-code", is_flag=True, help=TRUST_HELP)
def demo_evaluate(model: str, size: int, seeds: str, trust_spec_code: bool) -> None:
    """Pixel accuracy and IoU of the demo model on held-out generated scenes."""
    from pipeline.demo import evaluate_demo
    from pipeline.model import build_model
    from pipeline.modelspec import load_spec

    try:
        spec = load_spec(model)
        fcn = build_model(spec, trust_code=trust_spec_code)
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except (ValueError, PipelineError) as exc:
        _fail_usage(exc)
    result = evaluate_demo(fcn, spec.normalization, seeds=values, size=size)
    click.echo(f"pixel accuracy {result['pixel_accuracy']:.4f}, mean IoU {result['mean_iou']:.4f} "
               f"({len(values)} scenes of {size}x{size})")
    for name, value in result["iou"].items():
        click.echo(f"  IoU {name:<12} {value:.4f}")


@demo.command("speed")
@click.option("--threads", default=2, show_default=True)
@click.option("--repeats", default=10, show_default=True)
def demo_speed(threads: int, repeats: int) -> None:
    """Raw forward speed of the demo FCN (in-memory tensors, no I/O), Mpx/s per input size."""
    from pipeline.demo import benchmark_demo

    for size, speed in benchmark_demo(threads=threads, repeats=repeats).items():
        click.echo(f"{size} x {size}: {speed:.1f} Mpx/s ({threads} threads)")


def _summary(report: Any) -> str:
    header = (f"{'scene':<24} {'width x height':>15} {'tiles':>6} {'seconds':>8} {'Mpx/s':>7}  "
              f"{'status':<11} outputs")
    lines = [header, "-" * len(header)]
    for s in report.scenes:
        size = f"{s.shape[1]}x{s.shape[0]}" if s.shape else "-"
        outputs = ", ".join(Path(p).name for p in s.outputs.values()) or "-"
        status = "skipped" if s.skipped else s.status
        lines.append(f"{s.stem:<24} {size:>15} {s.tiles:>6} {s.seconds:>8.1f} "
                     f"{s.megapixels_per_second:>7.2f}  {status:<11} {outputs}")
    if any(s.skipped for s in report.scenes):
        lines.append("skipped: already published with the same input, model and settings "
                     "(figures of the run that made them)")
    lines += [f"{s.stem}: {s.exactness['summary']}" for s in report.scenes
              if s.exactness and not s.exactness.get("exact") and s.exactness.get("summary")]
    return "\n".join(lines)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's scenes as JSON.")
def status(directory: Path, as_json: bool) -> None:
    """Per-scene status of the run that writes or wrote DIRECTORY (from its manifest)."""
    from pipeline.journal import SceneRecord, lock_holder, read_manifest

    try:
        manifest = read_manifest(directory)
    except ConfigError as exc:
        _fail_usage(exc)
    live = lock_holder(directory.absolute()) is not None
    scenes = []
    for scene in manifest["scenes"]:
        scene = dict(scene)
        if scene.get("status") == "running":  # live (or killed) run: count the tile records
            scene["tiles_done"] = len(SceneRecord(directory.absolute(), scene["stem"]).tiles_done())
            if not live:  # no run holds the folder: the one that recorded this was killed
                scene["status"] = "stopped"
                scene["error"] = scene.get("error") or (
                    "the run ended without recording this scene (killed, or its manifest "
                    "could not be written); run it again to resume")
        scenes.append(scene)
    if as_json:
        click.echo(json.dumps({"status": manifest.get("status"), "run_id": manifest.get("run_id"),
                               "scenes": scenes}, indent=2))
        return
    header = f"{'scene':<24} {'status':<11} {'tiles':>11} {'attempts':>8} {'seconds':>8}  error"
    lines = [header, "-" * len(header)]
    for scene in scenes:
        error = (scene.get("error") or "").splitlines()[0] if scene.get("error") else ""
        status_word = "skipped" if scene.get("skipped") else scene.get("status", "?")
        lines.append(f"{scene['stem']:<24} {status_word:<11} "
                     f"{scene.get('tiles_done', 0):>5}/{scene.get('tiles', 0):<5} "
                     f"{scene.get('attempts', 0):>8} {scene.get('seconds', 0.0):>8.1f}  {error}")
    click.echo("\n".join(lines))


def _forget_current_folder() -> None:
    """Take the current folder off ``sys.path`` when ``python -m pipeline.cli`` put it there.

    Python puts the folder it was started from first on ``sys.path`` for ``-m``, and
    ``importlib.metadata`` would then read packages' metadata there: a
    ``*.dist-info/entry_points.txt`` in the folder a run starts from would register an
    architecture, and a spec naming it would run that folder's code without
    ``--trust-spec-code``, here and on workers (they start with this process's path).
    As Python's ``-P`` does; PYTHONPATH's entries stay. Kept when this package itself
    was imported from that folder (a source checkout): its code is what runs anyway.
    """
    if getattr(sys.flags, "safe_path", False) or not sys.path:  # -P (Python 3.11)
        return
    here = os.getcwd()
    first = os.path.abspath(sys.path[0] or os.curdir)
    if first != here:
        return
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.samefile(package_parent, here):
        return
    del sys.path[0]


if __name__ == "__main__":  # pragma: no cover
    _forget_current_folder()
    main()
