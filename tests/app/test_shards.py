"""Sharded evaluation: the shards split the evaluated images, `snnbench report` merges a run's complete shards into
exactly what the unsharded run writes and names the shards it cannot merge; device=cuda:N and one GPU per
process for device=auto."""

import json
import multiprocessing
import os
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import snnbench
from typer.testing import CliRunner

from snnbench.app import devices, pipeline
from snnbench.app.cli import app
from snnbench.errors import UserError
from snnbench.io.data import build_splits, shard_of
from snnbench.io.files import write_json

RUN = ("sim.T=6", "sim.num_samples=150", "train.epochs=2")


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """One unsharded run on digits and the same run in 4 shards (a sweep), sharing one cache."""
    root = tmp_path_factory.mktemp("digits")
    cache = f"cache_dir={root / 'cache'}"
    done = snnbench("run", *RUN, cache, f"hydra.run.dir={root / 'whole'}")
    assert done.returncode == 0, done.stderr
    done = snnbench("run", "-m", *RUN, cache, "sim.shard=range(0,4)", "sim.num_shards=4",
                    f"hydra.sweep.dir={root / 'sharded'}")
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def sweep(digits_runs, tmp_path):
    """A copy of the sharded sweep to report on (and break)."""
    return shutil.copytree(digits_runs / "sharded", tmp_path / "sharded")


def report(*args):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def test_shards_are_disjoint_seeded_parts_of_the_evaluated_images(cfg):
    images = list(range(103))
    parts = [list(shard_of(images, shard, 4, seed=1)) for shard in range(4)]
    assert sorted(sum(parts, [])) == images
    assert sorted(len(part) for part in parts) == [25, 26, 26, 26]
    assert parts == [list(shard_of(images, shard, 4, seed=1)) for shard in range(4)]  # the seed decides alone
    assert parts != [list(shard_of(images, shard, 4, seed=2)) for shard in range(4)]
    assert shard_of(images, 0, 1, seed=1) is images

    cfg.sim.num_samples = 200  # the shards split the seeded selection, not the whole test split
    splits = build_splits(cfg.dataset)

    def evaluated(shard, num_shards):
        cfg.sim.shard, cfg.sim.num_shards = shard, num_shards
        return sorted(image.numpy().tobytes() for image, _ in pipeline.evaluated_images(cfg, splits))

    assert sorted(sum((evaluated(shard, 3) for shard in range(3)), [])) == evaluated(0, 1)


@pytest.mark.parametrize("shard, num_shards, message", [
    (4, 4, "sim.shard must be an integer from 0 to sim.num_shards - 1 = 3, got 4: run the shards as "
           "`-m sim.shard=range(0,4)`"),
    (-1, 2, "sim.shard must be an integer from 0 to sim.num_shards - 1 = 1, got -1: run the shards as "
            "`-m sim.shard=range(0,2)`"),
    (0, 0, "sim.num_shards must be a positive integer, got 0: e.g. sim.num_shards=4"),
    (0, 1.5, "sim.num_shards must be a positive integer, got 1.5: e.g. sim.num_shards=4"),
])
def test_impossible_shards_are_refused(cfg, shard, num_shards, message):
    cfg.sim.shard, cfg.sim.num_shards = shard, num_shards
    with pytest.raises(UserError) as raised:
        pipeline.validate(cfg)
    assert str(raised.value) == message


def test_more_shards_than_images_are_refused_before_any_work(cfg, tmp_path):
    cfg.sim.num_samples, cfg.sim.num_shards = 3, 4
    with pytest.raises(UserError, match="sim.num_shards=4 is more than the 3 evaluated images"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_four_merged_shards_are_the_unsharded_run(digits_runs, sweep):
    done = report(sweep)
    assert done.exit_code == 0, done.output
    merged, whole = sweep / "merged" / "0_baseline", digits_runs / "whole"
    for name in ("accuracy.csv", "layers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(merged / name), pd.read_csv(whole / name), check_exact=False,
                                      rtol=1e-12, atol=0)
    assert json.loads((merged / "counts.json").read_text()) == json.loads((whole / "counts.json").read_text())
    summaries = [json.loads((run / "summary.json").read_text()) for run in (merged, whole)]
    for key in ("ann_accuracy", "snn_accuracy", "num_test_images", "events_per_image", "sops_per_image"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["merged_from"] == [str(sweep / f"{shard}_baseline") for shard in range(4)]
    assert [json.loads((sweep / f"{shard}_baseline" / "summary.json").read_text())["num_test_images"]
            for shard in range(4)] == [38, 38, 37, 37]
    tidy = pd.read_csv(sweep / "report.csv")
    assert tidy.run.unique().tolist() == [str(merged)] and set(tidy.num_test_images) == {150}
    assert pd.read_csv(sweep / "accuracy_vs_t.csv").columns.tolist() == ["t", "baseline"]
    assert pd.read_csv(sweep / "failed.csv").empty
    # calibration and conversion done once, by the unsharded run: every shard found them in the cache
    logs = [(sweep / f"{shard}_baseline" / "snnbench.log").read_text() for shard in range(4)]
    assert all("using cached calibration" in log and "using cached conversion" in log for log in logs)

    assert report(sweep).exit_code == 0  # a second report rebuilds the merge instead of counting it twice
    assert pd.read_csv(sweep / "report.csv").run.unique().tolist() == [str(merged)]


def test_a_missing_shard_is_named_and_nothing_is_merged(sweep):
    assert report(sweep).exit_code == 0
    shutil.rmtree(sweep / "2_baseline")
    done = report(sweep)
    assert done.exit_code == 2  # no complete run is left to report
    assert f"missing: {sweep}: sim.shard=2 of sim.num_shards=4" in done.output.replace("\n", "")
    failed = pd.read_csv(sweep / "failed.csv")
    assert failed.status.tolist() == ["missing", "unmerged", "unmerged", "unmerged"]
    assert failed["sim.shard"].tolist() == [2, 0, 1, 3]
    assert failed.run.tolist()[1:] == [str(sweep / f"{shard}_baseline") for shard in (0, 1, 3)]
    assert all("shard 2 missing" in error for error in failed.error[1:])
    assert not (sweep / "merged" / "0_baseline").exists()  # the earlier merge is gone with its shard


def test_failed_twice_complete_and_mismatched_shards_are_not_merged(sweep):
    failed_shard = sweep / "1_baseline"
    write_json(failed_shard / "error.json", {"error": "out of memory"})
    summary_time = (failed_shard / "summary.json").stat().st_mtime
    os.utime(failed_shard / "error.json", (summary_time + 10, summary_time + 10))
    done = report(sweep)
    assert done.exit_code == 2
    failed = pd.read_csv(sweep / "failed.csv")
    assert failed.status.tolist() == ["failed", "unmerged", "unmerged", "unmerged"]
    assert failed.run[0] == str(failed_shard) and failed.error[0] == "out of memory"
    assert "shard 1 failed or unfinished" in failed.error[1]

    (failed_shard / "error.json").unlink()
    shutil.copytree(sweep / "3_baseline", sweep / "7_baseline")
    assert report(sweep).exit_code == 2
    assert "shard 3 complete twice" in pd.read_csv(sweep / "failed.csv").error[0]

    shutil.rmtree(sweep / "7_baseline")
    layers = pd.read_csv(sweep / "3_baseline" / "layers.csv")
    layers.loc[0, "threshold"] *= 2
    layers.to_csv(sweep / "3_baseline" / "layers.csv", index=False)
    assert report(sweep).exit_code == 2
    assert "3_baseline differs from shard 0 in layers.csv" in pd.read_csv(sweep / "failed.csv").error[0]


def test_sets_of_shards_are_told_apart_by_their_overrides(sweep, tmp_path):
    other = shutil.copytree(sweep, tmp_path / "other")
    for folder, v0 in ((sweep, "0.0"), (other, "0.25")):  # as if two sweeps had set different knobs
        for shard in range(4):
            overrides = folder / f"{shard}_baseline" / ".hydra" / "overrides.yaml"
            overrides.write_text(overrides.read_text() + f"- method.v0={v0}\n")
    done = report(sweep, other, "--out", tmp_path / "report")
    assert done.exit_code == 0, done.output
    merged = tmp_path / "report" / "merged"
    assert sorted(path.name for path in merged.iterdir()) == ["0_baseline", "0_baseline_2"]
    assert pd.read_csv(tmp_path / "report" / "accuracy_vs_t.csv").columns.tolist() == ["t", "baseline v0=0.25",
                                                                                       "baseline v0=0.0"]


def test_device_names(monkeypatch, tmp_path):
    for name in ("gpu", "cuda:", "cuda:x", "cpu:0"):
        with pytest.raises(UserError, match="device must be auto, cpu, cuda or cuda:N"):
            devices.check_device(name)
    gpus = [SimpleNamespace(uuid=f"GPU-{index}") for index in range(3)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])
    monkeypatch.setattr(devices, "_claimed", {})
    monkeypatch.setattr(devices, "gpu_lock_folder", lambda: tmp_path)
    assert devices.resolve_device("cuda:2") == "cuda:2"
    with pytest.raises(UserError, match=r"device=cuda:3 but this machine has 3 CUDA device\(s\), cuda:0 to cuda:2"):
        devices.resolve_device("cuda:3")
    assert devices.resolve_device("auto") == "cuda:0"
    assert devices.resolve_device("auto") == "cuda:0"  # the same GPU for every job of this process
    assert (tmp_path / "GPU-0.lock").exists()


def hold_a_gpu(folder, claimed, release):
    try:
        claimed.put(devices.claim_gpu(["GPU-a", "GPU-b"], folder))
    except UserError as err:
        claimed.put(str(err))
        return
    release.wait()


def test_each_process_gets_a_gpu_of_its_own_until_it_exits(tmp_path):
    context = multiprocessing.get_context("fork")  # fork: the children need no imports of their own
    claimed, release = context.Queue(), context.Event()

    def start():
        process = context.Process(target=hold_a_gpu, args=(tmp_path, claimed, release))
        process.start()
        return process, claimed.get(timeout=60)

    (first, a), (second, b), (third, refused) = start(), start(), start()
    assert {a, b} == {0, 1}
    assert refused == ("device=auto: all 2 GPUs here are held by other snnbench jobs: run at most 2 at once "
                       "(hydra.launcher.n_jobs=2), or share one with device=cuda:N")
    third.join(timeout=60)
    release.set()
    for process in (first, second):
        process.join(timeout=60)
    release.clear()
    fourth, index = start()  # the exited processes gave their GPUs back
    assert index == 0
    release.set()
    fourth.join(timeout=60)
