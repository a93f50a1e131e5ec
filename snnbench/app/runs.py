"""Run folders: finding them under a folder, their status, their overrides."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from snnbench.errors import UserError

RUN_MARKERS = ("summary.json", "error.json", ".hydra")  # a folder holding any of these is a run
RESULTS_BEFORE_SUMMARY = ("accuracy.csv", "layers.csv", "counts.json")  # a run's results, written before summary.json
# what `snnbench report` reads of a complete run
SUMMARY_KEYS = ("ann_accuracy", "T", "macs_per_image")
ACCURACY_COLUMNS = ("method", "dataset", "model", "t", "accuracy", "events_per_image", "sops_per_image")
LAYERS_COLUMNS = ("layer", "firing_rate")


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
    overrides = OmegaConf.load(path)
    if not OmegaConf.is_list(overrides):
        raise ValueError("not a list of overrides")
    pairs = (str(item).partition("=") for item in overrides)
    return {key.lstrip("+~"): value for key, _, value in pairs}


class UnreadableRun(Exception):
    """A run folder with a file that `snnbench report` cannot read (damaged, truncated, missing): the message names
    the file and what is wrong with it."""


@dataclass
class RunFiles:
    """What `snnbench report` reads of one run folder, each file checked (read_run)."""
    status: str                         # run_status
    overrides: dict[str, str]           # read_overrides
    error: str = ""                     # a failed run's error.json message
    summary: dict | None = None         # a complete run's summary.json ...
    accuracy: pd.DataFrame | None = None  # ... and accuracy.csv


def read_run(run: Path) -> RunFiles:
    """The run folder's files as the report reads them, or an UnreadableRun naming the first that cannot be read.
    A run that did not finish is checked as far as it got (its config, which the shards' merge reads)."""
    status = run_status(run)
    files = RunFiles(status, _read(run / ".hydra" / "overrides.yaml", read_overrides, run))
    if status == "complete":
        files.summary = _read(run / "summary.json", _summary)
        files.accuracy = _read(run / "accuracy.csv", lambda path: _accuracy(path, files.summary["T"]))
        _read(run / "layers.csv", _layers)
    else:
        _read(run / ".hydra" / "config.yaml", _config)
        if status == "failed":
            files.error = _read(run / "error.json", _error)
    return files


def _read(path: Path, parse, *args):
    try:
        return parse(*args) if args else parse(path)
    except Exception as err:  # whatever a damaged file raises (JSON, YAML, CSV parsers; a missing file)
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UnreadableRun(f"cannot read {path.name} ({type(err).__name__}: {reason})") from err


def _json_object(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def _summary(path: Path) -> dict:
    summary = _json_object(path)
    wrong = [key for key in SUMMARY_KEYS if isinstance(summary.get(key), bool) or
             not isinstance(summary.get(key), int | float)]
    if wrong or summary["T"] != int(summary["T"]) or summary["T"] < 1:
        raise ValueError(f"{', '.join(wrong) or 'T'} missing or not a number")
    return summary


def _accuracy(path: Path, T: int) -> pd.DataFrame:
    accuracy = pd.read_csv(path)
    missing = [column for column in ACCURACY_COLUMNS if column not in accuracy.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    if len(accuracy) != T or accuracy[list(ACCURACY_COLUMNS)].isna().any(axis=None) or (
            accuracy.t.tolist() != list(range(1, T + 1))):
        raise ValueError(f"not one complete row for each t = 1..{T}: truncated?")
    return accuracy


def _layers(path: Path):
    layers = pd.read_csv(path)
    # analog operators and products of spike trains do not fire
    spiking = layers[~layers.kind.isin(["analog", "product of spike trains"])] if "kind" in layers else layers
    if [column for column in LAYERS_COLUMNS if column not in layers.columns] or spiking.firing_rate.isna().any():
        raise ValueError(f"not the columns {', '.join(LAYERS_COLUMNS)} complete: truncated?")


def _config(path: Path):
    if path.exists() and not isinstance(OmegaConf.to_container(OmegaConf.load(path)), dict):
        raise ValueError("not a mapping of config keys")


def _error(path: Path) -> str:
    return str(_json_object(path).get("error", ""))
