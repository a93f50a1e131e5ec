"""`snnbench report` on hand-made run folders: aggregation, pivot, failed runs, plots, bad input."""

import os
import xml.etree.ElementTree as ElementTree

import pandas as pd
from helpers import fake_run, sweep, write_overrides
from matplotlib.image import imread
from typer.testing import CliRunner

from snnbench.app.cli import app
from snnbench.app.report import collect, pivot_accuracy
from snnbench.app.runs import find_runs, run_status
from snnbench.io.files import write_json

REPORT_FILES = ("report.csv", "accuracy_vs_t.csv", "accuracy_vs_t.png", "accuracy_vs_sops.png",
                "firing_rates.png", "failed.csv")


def test_pivot_columns_are_methods_labelled_with_what_else_varies(tmp_path):
    tidy, failed = collect(find_runs([sweep(tmp_path)]))
    assert failed.empty
    assert len(tidy) == 4 * 3
    assert {"run", "label", "sim.T", "cache_dir", "method.threshold_scale", "method", "t", "accuracy",
            "sops_per_image", "ann_accuracy"} <= set(tidy.columns)
    pivot = pivot_accuracy(tidy)
    # cache_dir differs too, but says where files live, not what was computed: it stays out of the labels
    assert list(pivot.columns) == ["baseline", "termapping", "augmapping threshold_scale=1.0",
                                   "augmapping threshold_scale=0.5"]
    assert pivot.index.tolist() == [1, 2, 3]
    assert pivot["termapping"].tolist() == [0.2, 0.6, 0.85]
    assert pivot["augmapping threshold_scale=0.5"].tolist() == [0.4, 0.75, 0.9]


def test_identical_settings_from_two_sweeps_stay_apart(tmp_path):
    for sweep_name in ("a", "b"):
        fake_run(tmp_path / sweep_name / "0_baseline", ["method=baseline"], [0.5, 0.6])
    tidy, _ = collect(find_runs([tmp_path / "a", tmp_path / "b"]))
    assert pivot_accuracy(tidy).columns.tolist() == [f"baseline [{tmp_path / s / '0_baseline'}]" for s in "ab"]


def test_report_command_writes_tables_and_plots_and_lists_failures(tmp_path):
    root = sweep(tmp_path / "sweep")
    write_overrides(root / "4_4", ["method=augmapping", "sim.T=0"])
    write_json(root / "4_4" / "error.json", {"error": "sim.T must be a positive integer, got 0"})
    write_overrides(root / "10_10", ["method=baseline", "sim.T=3"])  # started, never finished
    done = CliRunner().invoke(app, ["report", str(root)])
    assert done.exit_code == 0, done.output
    for name in REPORT_FILES:
        assert (root / name).exists(), name
    for name in REPORT_FILES[2:4]:
        assert imread(root / name).shape[:2] == (540, 840), name  # 7 x 4.5 inches at 120 dpi
    # one panel per complete run, 2.4 inches each: every run's firing rates, not only the first run's
    assert imread(root / "firing_rates.png").shape[:2] == (round(120 * (1.2 + 2.4 * 4)), 840)
    pivot = pd.read_csv(root / "accuracy_vs_t.csv")
    assert pivot.columns.tolist() == ["t", "baseline", "termapping", "augmapping threshold_scale=1.0",
                                      "augmapping threshold_scale=0.5"]
    assert pivot.baseline.tolist() == [0.1, 0.5, 0.8]
    failed = pd.read_csv(root / "failed.csv")
    assert failed.run.tolist() == [str(root / "4_4"), str(root / "10_10")]  # natural order: job 4 before 10
    assert failed.status.tolist() == ["failed", "incomplete"]
    assert failed.error[0] == "sim.T must be a positive integer, got 0"
    assert "failed:" in done.output and "incomplete:" in done.output
    assert "termapping" in done.output and "85.00" in done.output  # the pivot table, accuracy at t=3 in %


def test_report_writes_into_out_in_every_format_asked_for(tmp_path):
    root = sweep(tmp_path / "sweep")
    out = tmp_path / "paper"
    done = CliRunner().invoke(app, ["report", str(root), "--out", str(out), "--format", "png,pdf,svg"])
    assert done.exit_code == 0, done.output
    plots = [f"{name}.{suffix}" for name in ("accuracy_vs_t", "accuracy_vs_sops", "firing_rates")
             for suffix in ("png", "pdf", "svg")]
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.csv", "accuracy_vs_t.csv", "failed.csv", *plots])
    assert pd.read_csv(out / "failed.csv").empty
    assert not (root / "report.csv").exists()
    assert (out / "accuracy_vs_t.pdf").read_bytes().startswith(b"%PDF")
    svg = ElementTree.parse(out / "firing_rates.svg").getroot()
    assert svg.tag.endswith("svg")
    # the titles name the data and the model, each run's panel its label (matplotlib's SVG keeps every text in a
    # comment beside its drawing)
    for name, titles in (("accuracy_vs_t", ["SNN accuracy vs latency: digits / mlp"]),
                         ("accuracy_vs_sops", ["accuracy vs synaptic operations: digits / mlp"]),
                         ("firing_rates", ["firing rates: digits / mlp, T=3", "baseline", "termapping",
                                           "augmapping threshold_scale=1.0", "augmapping threshold_scale=0.5"])):
        text = (out / f"{name}.svg").read_text()
        for title in titles:
            assert f"<!-- {title} -->" in text, (name, title)


def test_a_reused_run_folder_reports_its_latest_outcome(tmp_path):
    fake_run(tmp_path, ["method=baseline"], [0.5])
    assert run_status(tmp_path) == "complete"
    write_json(tmp_path / "error.json", {"error": "boom"})
    summary_time = (tmp_path / "summary.json").stat().st_mtime
    os.utime(tmp_path / "error.json", (summary_time + 10, summary_time + 10))
    assert run_status(tmp_path) == "failed"


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    fake_run(tmp_path / "failed_only", ["method=baseline"], [0.5])
    (tmp_path / "failed_only" / "summary.json").unlink()
    write_json(tmp_path / "failed_only" / "error.json", {"error": "boom"})
    cases = {str(tmp_path / "missing"): "is not a folder",
             str(tmp_path / "empty"): "no runs in",
             str(tmp_path / "failed_only"): "no complete runs in"}
    for folder, message in cases.items():
        done = CliRunner().invoke(app, ["report", folder])
        assert done.exit_code == 2
        assert message in done.output and "Traceback" not in done.output
    done = CliRunner().invoke(app, ["report", str(sweep(tmp_path / "sweep")), "--format", "png,jpg"])
    assert done.exit_code == 2
    assert "error: --format takes png, pdf, svg (comma-separated, e.g. png,pdf), got 'png,jpg'" in done.output
    assert not (tmp_path / "sweep" / "report.csv").exists()  # refused before anything was written


def test_report_into_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder\n")
    done = CliRunner().invoke(app, ["report", str(sweep(tmp_path / "sweep")), "--out", str(blocker / "report")])
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert done.output.endswith(f"error: cannot write {blocker / 'report' / 'failed.csv'} (Not a directory): make "
                                f"{blocker / 'report'} writable, or choose another folder (hydra.run.dir, cache_dir, "
                                "report --out)\n")
