"""Sweeps: parallel jobs (joblib) share one trained ANN, a failing job leaves the others alone, and
`snnbench report` turns the sweep folder into its tables; the presets and the SLURM launcher config compose."""

import json
import multiprocessing
import time

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from test_cli import snnbench  # tests/ is on sys.path (pytest rootdir-relative imports)
from typer.testing import CliRunner

from snnbench.cli import CONF_DIR, app, options
from snnbench.pipeline import validate
from snnbench.train import cached


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


def test_parallel_sweep_trains_once_and_reports(tmp_path):
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    # jobs 0 and 1 start together and need the same ANN; jobs 2 and 3 fail (no test images)
    done = snnbench("run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sim.num_samples=40,0",
                    "method=baseline,augmapping", "sim.T=4", "train.epochs=1", f"hydra.sweep.dir={sweep_dir}",
                    f"cache_dir={cache}")
    assert done.returncode == 1, done.stderr  # the sweep finished, and says that jobs failed
    assert "2 sweep job(s) failed" in done.stdout + done.stderr
    logs = "".join(path.read_text() for path in sorted(sweep_dir.glob("*/snnbench.log")))
    assert logs.count("training ANN") == 1
    assert logs.count("using cached ANN") == 1
    assert logs.count("calibrating") == 1
    assert len(list((cache / "ann").glob("*.pt"))) == 1
    for job in ("0_baseline", "1_augmapping"):
        assert (sweep_dir / job / "summary.json").exists()
    for job in ("2_baseline", "3_augmapping"):
        assert "sim.num_samples" in json.loads((sweep_dir / job / "error.json").read_text())["error"]

    done = CliRunner().invoke(app, ["report", str(sweep_dir)])
    assert done.exit_code == 0, done.output
    pivot = pd.read_csv(sweep_dir / "accuracy_vs_t.csv")
    assert pivot.columns.tolist() == ["t", "baseline", "augmapping"]  # num_samples is the same in every complete run
    assert pivot.t.tolist() == [1, 2, 3, 4]
    report = pd.read_csv(sweep_dir / "report.csv")
    assert len(report) == 2 * 4 and set(report["sim.num_samples"]) == {40}
    assert pd.read_csv(sweep_dir / "failed.csv").run.tolist() == [str(sweep_dir / "2_baseline"),
                                                                   str(sweep_dir / "3_augmapping")]
    for name in ("accuracy_vs_t.png", "accuracy_vs_sops.png", "firing_rates.png"):
        assert (sweep_dir / name).stat().st_size > 0
    assert "augmapping" in done.output


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
