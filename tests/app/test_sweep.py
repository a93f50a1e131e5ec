"""Sweeps: parallel jobs (joblib) share one trained ANN, a failing job leaves the others alone, and
`snnbench report` turns the sweep folder into its tables; the presets and the SLURM launcher config compose."""

import json
import multiprocessing
import time

import pandas as pd
import pytest
from helpers import snnbench
from hydra import compose, initialize_config_dir

from snnbench.app.cli import CONF_DIR, options
from snnbench.app.pipeline import validate
from snnbench.io.cache import cached


def ask_for_entry(path, barrier, build_log):
    def build():
        time.sleep(0.5)  # hold the claim while the other processes arrive
        with open(build_log, "a") as log:
            log.write("built\n")
        return b"weights"

    barrier.wait()  # every process asks for the entry at the same moment
    value, _, _ = cached(path, "key", build, lambda data: data, lambda p: p.read_bytes())
    assert value == b"weights"


def test_processes_asking_for_one_cache_entry_build_it_once(tmp_path):
    context = multiprocessing.get_context("fork")  # fork: the children need no imports of their own
    barrier = context.Barrier(3)
    workers = [context.Process(target=ask_for_entry, args=(tmp_path / "ann.pt", barrier, tmp_path / "builds"))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert (tmp_path / "builds").read_text() == "built\n"


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_two_job_sweep_through_a_launcher_trains_once_and_reports(tmp_path, launcher):
    """Real launchers: joblib's worker processes, and submitit's local executor (real processes and pickling, the
    code path of SLURM jobs). The two jobs start together and need the same ANN; `snnbench report` then merges them."""
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    parallel = "hydra.launcher.n_jobs=2" if launcher == "joblib" else "hydra.launcher.tasks_per_node=1"
    done = snnbench("run", "-m", f"hydra/launcher={launcher}", parallel, "method=baseline,augmapping", "sim.T=4",
                    "train.epochs=1", "sim.num_samples=40", f"hydra.sweep.dir={sweep_dir}", f"cache_dir={cache}")
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(f"sweep results in {sweep_dir} (tables and plots: snnbench report {sweep_dir})\n")
    logs = "".join(path.read_text() for path in sorted(sweep_dir.glob("*/snnbench.log")))
    assert logs.count("training ANN") == 1 and logs.count("using cached ANN") == 1
    assert logs.count("calibrating") == 1
    assert len(list((cache / "ann").glob("*.pt"))) == 1
    for job in ("0_baseline", "1_augmapping"):
        assert json.loads((sweep_dir / job / "summary.json").read_text())["T"] == 4

    report = snnbench("report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    assert "augmapping" in report.stdout and "baseline" in report.stdout  # the pivot, on stdout
    assert report.stderr.startswith("2 complete and 0 failed, incomplete or unreadable runs")
    pivot = pd.read_csv(sweep_dir / "accuracy_vs_t.csv")
    assert pivot.columns.tolist() == ["t", "baseline", "augmapping"] and pivot.t.tolist() == [1, 2, 3, 4]
    assert len(pd.read_csv(sweep_dir / "report.csv")) == 2 * 4
    assert pd.read_csv(sweep_dir / "failed.csv").empty
    for name in ("accuracy_vs_t.png", "accuracy_vs_sops.png", "firing_rates.png"):
        assert (sweep_dir / name).stat().st_size > 0


def compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_digits_methods_preset_sweeps_the_three_methods():
    cfg = compose_with_hydra("experiment=digits_methods")
    assert cfg.hydra.sweeper.params.method == "baseline,termapping,augmapping"
    assert cfg.dataset.name == "digits" and cfg.sim.T == 16


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_preset_composes_and_validates_for_each_swept_method(preset):
    methods = compose_with_hydra(f"experiment={preset}").hydra.sweeper.params.method.split(",")
    assert len(methods) >= 2
    for method in methods:
        cfg = compose_with_hydra(f"experiment={preset}", f"method={method}")
        assert cfg.method.name == method
        validate(cfg)


def test_slurm_launcher_config_composes():
    launcher = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.gpus_per_task == 1
