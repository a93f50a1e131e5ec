"""Run folders: finding them under a folder, their status, their overrides."""

import re
from pathlib import Path

from omegaconf import OmegaConf

from snnbench.errors import UserError

RUN_MARKERS = ("summary.json", "error.json", ".hydra")  # a folder holding any of these is a run
RESULTS_BEFORE_SUMMARY = ("accuracy.csv", "layers.csv", "counts.json")  # a run's results, written before summary.json


FAILED_COLUMNS = ("run", "status", "error")


def _natural(path: Path):
    """Sort key that puts sweep job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(dirs) -> list[Path]:
    """Every run folder in `dirs`: a run folder itself, a sweep folder, or any tree of them."""
    runs = set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder: give run or sweep folders, e.g. outputs/multirun/<date>/<time>")
        found = {marker.parent for name in RUN_MARKERS for marker in folder.rglob(name)}
        if not found:
            raise UserError(f"no runs in {folder}: a run folder holds summary.json, error.json or .hydra/")
        runs |= found
    return sorted(runs, key=_natural)


def run_status(run: Path) -> str:
    """complete (summary.json is written last), failed (error.json) or incomplete (still running, or killed).
    A folder reused by a later run holds both files: the newer one tells."""
    summary, error = run / "summary.json", run / "error.json"
    if summary.exists() and not (error.exists() and error.stat().st_mtime > summary.stat().st_mtime):
        return "complete"
    return "failed" if error.exists() else "incomplete"


def read_overrides(run: Path) -> dict[str, str]:
    """The run's command-line overrides (.hydra/overrides.yaml) as {key: value}: the parameters a sweep varies."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    pairs = (str(item).partition("=") for item in OmegaConf.load(path))
    return {key.lstrip("+~"): value for key, _, value in pairs}
