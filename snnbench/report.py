"""Atomic CSV/JSON writers, the terminal table of one run, and `snnbench report`: runs merged into comparison
tables and plots."""

import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from snnbench.errors import UserError

console = Console(stderr=True)  # diagnostics: log lines, progress bars, errors, where the results went
results = Console()             # results: the tables of runs and reports, on stdout
UMASK = os.umask(0o022)  # read the process umask (the call also sets it) ...
os.umask(UMASK)          # ... and put it back at once


class ConsoleLog(RichHandler):
    """Log records on the diagnostics console. In a terminal rich prints them above the progress bars, which
    share that console (a plain handler would write onto a bar's line); into a file or a pipe each is one plain
    line (rich would wrap it at 80 columns), with its level when that is not INFO."""

    def __init__(self):
        super().__init__(console=console, show_path=False)

    def emit(self, record):
        if self.console.is_terminal:
            super().emit(record)
            return
        level = "" if record.levelname == "INFO" else f"{record.levelname.lower()}: "
        self.console.file.write(f"[{time.strftime('%H:%M:%S')}] {level}{self.format(record)}\n")
        self.console.file.flush()


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary name in the same folder, then rename: a reader never sees half a file. Every file
    snnbench writes goes through here; one that cannot be written is a UserError naming it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # mkstemp makes it private (0600); open() would not
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path} ({err.strerror or err}): make {path.parent} writable, or choose "
                            "another folder (hydra.run.dir, cache_dir, report --out)") from err
        raise


def write_csv(path, frame: pd.DataFrame):
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_json(path, data: dict):
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def milestones(T: int) -> list[int]:
    """The t shown in terminal tables: powers of two up to T, and T."""
    return sorted({2**k for k in range(T.bit_length())} | {T})


def show_run(summary: dict, accuracy: pd.DataFrame):
    """ANN accuracy, SNN accuracy and events per image at a few t (powers of two and T)."""
    T = summary["T"]
    table = Table(title=f"{summary['method']} on {summary['dataset']} / {summary['model']}: "
                        f"ANN {100 * summary['ann_accuracy']:.2f} %")
    table.add_column("t", justify="right")
    table.add_column("SNN accuracy %", justify="right")
    table.add_column("events / image", justify="right")
    table.add_column("spike units / image", justify="right")
    rows = accuracy.set_index("t")
    for t in milestones(T):
        row = rows.loc[t]
        table.add_row(str(t), f"{100 * row.accuracy:.2f}", f"{row.events_per_image:,.0f}",
                      f"{row.spike_units_per_image:,.0f}")
    results.print(table)


# ---- `snnbench report`: merge run folders into comparison tables and plots ----

RUN_MARKERS = ("summary.json", "error.json", ".hydra")  # a folder holding any of these is a run
SUMMARY_COLUMNS = ("ann_accuracy", "T", "num_test_images", "split", "coding", "macs_per_image", "checkpoint_sha256")
FAILED_COLUMNS = ("run", "status", "error")
# one marker shape per line, drawn hollow: lines that coincide (methods that agree) stay visible on top of each other
MARKERS = "osD^v<>ph*"
# overrides that say where a run keeps its files or how fast it goes, not what it computes: report.csv keeps them,
# the pivot's column labels leave them out
NOT_PARAMETERS = ("cache_dir", "dataset.root", "dataset.download", "dataset.verify", "device", "sim.batch_size",
                  "sim.sub_batch", "sim.chunk", "sim.max_memory_mb", "train.num_workers")


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


def collect(runs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """report.csv (one row per complete run x t, each override a column) and failed.csv (the other runs)."""
    frames, failed, swept = [], [], {}
    for run in runs:
        status, overrides = run_status(run), read_overrides(run)
        if status != "complete":
            error = json.loads((run / "error.json").read_text()).get("error", "") if status == "failed" else \
                "no summary.json: still running, or killed before it finished"
            failed.append({"run": str(run), "status": status, "error": error, **overrides})
            continue
        summary = json.loads((run / "summary.json").read_text())
        accuracy = pd.read_csv(run / "accuracy.csv")
        # method, dataset and model come from the run's own record, whatever the command line said
        overrides = {key: value for key, value in overrides.items() if key not in accuracy.columns}
        swept.update(dict.fromkeys(overrides))
        frames.append(accuracy.assign(run=str(run), **overrides, **{k: summary.get(k) for k in SUMMARY_COLUMNS}))
    failed = pd.DataFrame(failed) if failed else pd.DataFrame(columns=FAILED_COLUMNS)
    if not frames:
        return pd.DataFrame(), failed
    tidy = pd.concat(frames, ignore_index=True)
    tidy["label"] = label_runs(tidy, ["dataset", "model", *swept])
    first = ["run", "label", *swept]
    return tidy[first + [c for c in tidy.columns if c not in first]], failed


def label_runs(tidy: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Each run's column in the pivot: its method plus every key that differs between the runs (e.g.
    "augmapping threshold_scale=0.5"). Runs with identical settings are told apart by their folder."""
    runs = tidy.drop_duplicates("run").set_index("run")
    varying = [key for key in keys if key not in NOT_PARAMETERS and runs[key].astype(str).nunique() > 1]
    labels = runs.apply(lambda run: " ".join(
        [run.method] + [f"{key.removeprefix('method.')}={run[key]}" for key in varying if pd.notna(run[key])]),
        axis=1)
    duplicated = labels.duplicated(keep=False)
    labels[duplicated] = labels[duplicated] + " [" + labels.index[duplicated] + "]"
    return tidy.run.map(labels)


def pivot_accuracy(tidy: pd.DataFrame) -> pd.DataFrame:
    """accuracy_vs_t: rows t, one column per run label, in the order the runs were found."""
    return tidy.pivot(index="t", columns="label", values="accuracy")[tidy.label.unique()].rename_axis(columns=None)


def ann_references(tidy: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct ANN (dataset, model, accuracy), with its legend label."""
    anns = tidy.drop_duplicates(["dataset", "model", "ann_accuracy"]).copy()
    anns["name"] = "ANN" if len(anns) == 1 else "ANN " + anns.dataset + "/" + anns.model
    return anns


FORMATS = ("png", "pdf", "svg")


def _figure(title: str, xlabel: str, ylabel: str, panels: int = 1):
    """A figure of `panels` axes stacked over one another (one is 7 x 4.5 inches)."""
    # imported here: matplotlib takes seconds to import, and only `snnbench report` draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5 if panels == 1 else 1.2 + 2.4 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharey=True, squeeze=False)[:, 0]
    figure.suptitle(title)
    for panel in axes:
        panel.set(xlabel=xlabel, ylabel=ylabel)
        panel.grid(alpha=0.3)
    return figure, axes


def save_figure(figure, stem: Path, formats) -> list[str]:
    """`stem`.png / .pdf / .svg, one file per format; returns the names written."""
    names = []
    for file_format in formats:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=file_format, dpi=120)
        atomic_write_bytes(stem.with_suffix(f".{file_format}"), buffer.getvalue())
        names.append(f"{stem.name}.{file_format}")
    return names


def subject(tidy: pd.DataFrame) -> str:
    """The dataset and model of the runs, e.g. "digits / mlp" (each pair once, in the order found)."""
    return ", ".join(dict.fromkeys(tidy.dataset + " / " + tidy.model))


def plot_accuracy_vs_t(tidy: pd.DataFrame, pivot: pd.DataFrame, stem: Path, formats) -> list[str]:
    figure, (axes,) = _figure(f"SNN accuracy vs latency: {subject(tidy)}", "time steps t", "test accuracy (%)")
    for number, label in enumerate(pivot.columns):
        axes.plot(pivot.index, 100 * pivot[label], marker=MARKERS[number % len(MARKERS)], fillstyle="none",
                  label=label)
    steps = pivot.index[[0, -1]]  # a data line, not axhline: autoscaling keeps it off the frame's edge
    for ann in ann_references(tidy).itertuples():
        axes.plot(steps, [100 * ann.ann_accuracy] * 2, color="black", linestyle="--", linewidth=1,
                  label=f"{ann.name} {100 * ann.ann_accuracy:.2f} %")
    axes.set_xscale("log", base=2)
    ticks = milestones(int(pivot.index.max()))
    axes.set_xticks(ticks, labels=[str(t) for t in ticks])
    axes.legend()
    return save_figure(figure, stem, formats)


def plot_accuracy_vs_sops(tidy: pd.DataFrame, stem: Path, formats) -> list[str]:
    """The energy view: accuracy against synaptic operations spent per image up to t (the ANN at its MACs)."""
    figure, (axes,) = _figure(f"accuracy vs synaptic operations: {subject(tidy)}",
                              "operations per image (SNN: SOPs up to t)", "test accuracy (%)")
    for number, (label, run) in enumerate(tidy.groupby("label", sort=False)):
        axes.plot(run.sops_per_image, 100 * run.accuracy, marker=MARKERS[number % len(MARKERS)], fillstyle="none",
                  label=label)
    for ann in ann_references(tidy).itertuples():
        axes.plot(ann.macs_per_image, 100 * ann.ann_accuracy, marker="*", markersize=12, color="black",
                  linestyle="none", label=f"{ann.name} ({ann.macs_per_image:,.0f} MACs)")
    axes.set_xscale("log")
    axes.legend()
    return save_figure(figure, stem, formats)


def plot_firing_rates(tidy: pd.DataFrame, stem: Path, formats) -> list[str]:
    """Events per neuron per step in each spiking layer: one panel per complete run in `tidy`, titled with its
    label, on one rate scale."""
    runs = tidy.drop_duplicates("run")
    steps = ", ".join(f"T={T}" for T in dict.fromkeys(runs["T"]))
    figure, panels = _figure(f"firing rates: {subject(tidy)}, {steps}", "spiking layer",
                             "firing rate\n(events per neuron per step)", panels=len(runs))
    for axes, run in zip(panels, runs.itertuples(), strict=True):
        layers = pd.read_csv(Path(run.run) / "layers.csv")
        axes.bar(layers.layer, layers.firing_rate)
        axes.set_title(run.label, fontsize="medium")
        axes.tick_params(axis="x", labelrotation=45)
    return save_figure(figure, stem, formats)


def show_pivot(tidy: pd.DataFrame, pivot: pd.DataFrame):
    """The pivot at a few t (powers of two and each run's last t), on stdout."""
    last_steps = {int(pivot[label].last_valid_index()) for label in pivot.columns}
    anns = ", ".join(f"{ann.name} {100 * ann.ann_accuracy:.2f} %" for ann in ann_references(tidy).itertuples())
    table = Table(title=f"SNN accuracy % vs t ({anns})")
    table.add_column("t", justify="right")
    for label in pivot.columns:
        table.add_column(label, justify="right", overflow="fold")  # fold long labels, never cut them
    for t in sorted(set(milestones(int(pivot.index.max()))) | last_steps):
        table.add_row(str(t), *(f"{100 * value:.2f}" if pd.notna(value) else "-" for value in pivot.loc[t]))
    results.print(table)


def build_report(dirs, out, formats=("png",)):
    """`snnbench report`: every run under `dirs` into report.csv, accuracy_vs_t.csv, failed.csv and the plots
    accuracy_vs_t, accuracy_vs_sops and firing_rates in each of `formats`, in `out`; the pivot printed, the
    failed runs listed."""
    out = Path(out)
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format takes {', '.join(FORMATS)} (comma-separated, e.g. png,pdf), got "
                        f"{','.join(formats)!r}")
    from snnbench.shards import merge_shards  # imported here: shards builds on this module's readers and writers

    runs, unmerged = merge_shards(find_runs(dirs), out)  # each complete set of shards as one run
    tidy, failed = collect(runs)
    failed = pd.concat([failed, unmerged], ignore_index=True)
    write_csv(out / "failed.csv", failed)  # always written, so a stale list never outlives its fix
    for run in failed.itertuples():
        console.print(f"[red]{run.status}:[/red] {run.run}: {run.error}", highlight=False, soft_wrap=True)
    if tidy.empty:
        raise UserError(f"no complete runs in {', '.join(map(str, dirs))}: {len(failed)} failed or incomplete "
                        f"(listed in {out / 'failed.csv'})")
    pivot = pivot_accuracy(tidy)
    write_csv(out / "report.csv", tidy)
    write_csv(out / "accuracy_vs_t.csv", pivot.reset_index())
    plots = [*plot_accuracy_vs_t(tidy, pivot, out / "accuracy_vs_t", formats),
             *plot_accuracy_vs_sops(tidy, out / "accuracy_vs_sops", formats),
             *plot_firing_rates(tidy, out / "firing_rates", formats)]
    show_pivot(tidy, pivot)
    console.print(f"{tidy.run.nunique()} complete and {len(failed)} failed or incomplete runs: report.csv, "
                  f"accuracy_vs_t.csv, {', '.join(plots)}, failed.csv in {out}", highlight=False, soft_wrap=True)
