"""The layering contracts of pyproject.toml hold (import-linter)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout
    assert "6 kept, 0 broken" in done.stdout


def test_import_pipeline_does_not_load_heavy_packages() -> None:
    code = (
        "import sys, pipeline, pipeline.cli; "
        "print(sorted(m for m in ('torch', 'dask', 'rasterio', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_names_are_the_functions() -> None:
    import pipeline
    import pipeline.demo  # imports the module behind convolutionalize

    for name in ("receptive_field", "convolutionalize", "predict_tiled"):
        assert callable(getattr(pipeline, name)) and getattr(pipeline, name).__name__ == name
    assert pipeline.ReceptiveField.__name__ == "ReceptiveField"
