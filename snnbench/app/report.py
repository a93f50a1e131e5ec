"""`snnbench report`: runs merged into comparison tables and plots."""

import io
import os
from pathlib import Path

import pandas as pd
from rich.table import Table

from snnbench.app.console import console, milestones, results
from snnbench.app.runs import FAILED_COLUMNS, UnreadableRun, find_runs, read_run
from snnbench.app.shards import merge_shards
from snnbench.errors import UserError
from snnbench.io.files import UMASK, atomic_write_bytes, write_csv

os.umask(UMASK)          # ... and put it back at once


# ---- `snnbench report`: merge run folders into comparison tables and plots ----

SUMMARY_COLUMNS = ("ann_accuracy", "T", "num_test_images", "split", "coding", "macs_per_image", "checkpoint_sha256",
                   "event_driven_share")
# one marker shape per line, drawn hollow: lines that coincide (methods that agree) stay visible on top of each other
MARKERS = "osD^v<>ph*"
# overrides that say where a run keeps its files or how fast it goes, not what it computes: report.csv keeps them,
# the pivot's column labels leave them out
NOT_PARAMETERS = ("cache_dir", "dataset.root", "dataset.download", "dataset.verify", "device", "sim.batch_size",
                  "sim.sub_batch", "sim.chunk", "sim.max_memory_mb", "train.num_workers")


def collect(runs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """report.csv (one row per complete run x t, each override a column) and failed.csv (the other runs: failed,
    incomplete, or unreadable, with the file that cannot be read)."""
    frames, failed, swept = [], [], {}
    for run in runs:
        try:
            files = read_run(run)
        except UnreadableRun as err:
            failed.append(unreadable_row(run, err))
            continue
        status, overrides = files.status, files.overrides
        if status != "complete":
            error = files.error if status == "failed" else \
                "no summary.json: still running, or killed before it finished"
            failed.append({"run": str(run), "status": status, "error": error, **overrides})
            continue
        summary, accuracy = files.summary, files.accuracy
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


def split_readable(runs: list[Path]) -> tuple[list[Path], list[dict]]:
    """The runs whose files the report can read, and a failed.csv row for each of the others."""
    readable, unreadable = [], []
    for run in runs:
        try:
            read_run(run)
            readable.append(run)
        except UnreadableRun as err:
            unreadable.append(unreadable_row(run, err))
    return readable, unreadable


def unreadable_row(run: Path, err: UnreadableRun) -> dict:
    return {"run": str(run), "status": "unreadable", "error": f"{err}: the run is left out of the report"}


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


def figure_files(figure, stem: Path, formats) -> dict[Path, bytes]:
    """`stem`.png / .pdf / .svg, one file per format, as {path: content}."""
    files = {}
    for file_format in formats:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=file_format, dpi=120)
        files[stem.with_suffix(f".{file_format}")] = buffer.getvalue()
    return files


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def write_all(files: dict[Path, bytes]):
    """Write every file, or none: when one cannot be written, those this call wrote already are removed, so
    that a report is never half new."""
    written = []
    try:
        for path, data in files.items():
            atomic_write_bytes(path, data)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def subject(tidy: pd.DataFrame) -> str:
    """The dataset and model of the runs, e.g. "digits / mlp" (each pair once, in the order found)."""
    return ", ".join(dict.fromkeys(tidy.dataset + " / " + tidy.model))


def plot_accuracy_vs_t(tidy: pd.DataFrame, pivot: pd.DataFrame, stem: Path, formats) -> dict[Path, bytes]:
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
    return figure_files(figure, stem, formats)


def plot_accuracy_vs_sops(tidy: pd.DataFrame, stem: Path, formats) -> dict[Path, bytes]:
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
    return figure_files(figure, stem, formats)


def plot_firing_rates(tidy: pd.DataFrame, stem: Path, formats) -> dict[Path, bytes]:
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
    return figure_files(figure, stem, formats)


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

    readable, unreadable = split_readable(find_runs(dirs))
    runs, unmerged = merge_shards(readable, out)  # each complete set of shards as one run
    tidy, failed = collect(runs)
    failed = pd.concat([pd.DataFrame(unreadable, columns=FAILED_COLUMNS), failed, unmerged], ignore_index=True)
    write_csv(out / "failed.csv", failed)  # always written, so a stale list never outlives its fix
    for run in failed.itertuples():
        console.print(f"[red]{run.status}:[/red] {run.run}: {run.error}", highlight=False, soft_wrap=True)
    if tidy.empty:
        raise UserError(f"no complete runs in {', '.join(map(str, dirs))}: {len(failed)} failed or incomplete "
                        f"(listed in {out / 'failed.csv'})")
    pivot = pivot_accuracy(tidy)
    plots = {**plot_accuracy_vs_t(tidy, pivot, out / "accuracy_vs_t", formats),
             **plot_accuracy_vs_sops(tidy, out / "accuracy_vs_sops", formats),
             **plot_firing_rates(tidy, out / "firing_rates", formats)}
    write_all({out / "report.csv": csv_bytes(tidy), out / "accuracy_vs_t.csv": csv_bytes(pivot.reset_index()),
               **plots})
    show_pivot(tidy, pivot)
    console.print(f"{tidy.run.nunique()} complete and {len(failed)} failed, incomplete or unreadable runs: "
                  f"report.csv, accuracy_vs_t.csv, {', '.join(path.name for path in plots)}, failed.csv in {out}",
                  highlight=False, soft_wrap=True)
