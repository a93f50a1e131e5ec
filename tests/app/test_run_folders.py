"""Run folders: every run gets one of its own, a folder that holds a complete run or a run in progress is refused
untouched, a failed run's folder is reused; two identical runs started together both complete and share one cache
entry."""

import fcntl
import json
import subprocess
import sys

import pandas as pd
from omegaconf import OmegaConf

from snnbench.app.cli import CONF_DIR, new_folder
from snnbench.io.cache import sha256_of

RUN = ("sim.T=2", "train.epochs=1", "sim.num_samples=20")


def snnbench(*args, cwd=CONF_DIR.parent):
    return subprocess.run([sys.executable, "-m", "snnbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_taken_name_gets_the_next_free_folder(tmp_path):
    base = tmp_path / "runs" / "12-00-00_digits_baseline"
    assert [new_folder(str(base)) for _ in range(3)] == [str(base), f"{base}-2", f"{base}-3"]
    assert sorted(p.name for p in base.parent.iterdir()) == [base.name, f"{base.name}-2", f"{base.name}-3"]


def test_folder_holding_a_complete_run_is_refused_and_left_as_it_was(tmp_path):
    folder, cache = tmp_path / "run", f"cache_dir={tmp_path / 'cache'}"
    done = snnbench("run", *RUN, cache, f"hydra.run.dir={folder}")
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(f"\nresults in {folder}\n")
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    for changed in ("sim.T=3", "sim.T=0"):  # another run, and one that would fail
        again = snnbench("run", *RUN, changed, cache, f"hydra.run.dir={folder}")
        assert again.returncode == 2
        assert again.stderr == (f"error: {folder} already holds a complete run (summary.json): choose another "
                                f"hydra.run.dir (unset, each run gets a new folder), or delete {folder} to run it "
                                "again\n")
        assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert OmegaConf.load(folder / ".hydra" / "overrides.yaml")[0] == "sim.T=2"  # the config of its summary.json


def test_folder_of_a_failed_run_is_reused_by_the_next_run(tmp_path):
    folder, cache = tmp_path / "run", f"cache_dir={tmp_path / 'cache'}"
    failed = snnbench("run", *RUN, "sim.T=0", cache, f"hydra.run.dir={folder}")
    assert failed.returncode == 2 and (folder / "error.json").exists()
    done = snnbench("run", *RUN, cache, f"hydra.run.dir={folder}")
    assert done.returncode == 0, done.stderr
    assert not (folder / "error.json").exists()
    assert json.loads((folder / "summary.json").read_text())["T"] == 2
    assert "sim.T=0" not in (folder / ".hydra" / "overrides.yaml").read_text()


def test_folder_in_use_by_a_run_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with open(folder / ".lock", "a") as lock:  # what a run in progress holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = snnbench("run", *RUN, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={folder}")
    assert done.returncode == 2
    assert done.stderr == (f"error: {folder} is in use by a run in progress: choose another hydra.run.dir, or wait "
                           "until that run ends\n")
    # nothing written into it: the log file is opened at its first line (console.RunLogFile), which never came
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_two_identical_runs_started_together_complete_apart_and_share_one_cache_entry(tmp_path):
    """Both runs ask for the same folder name (as two runs started in the same second do): each gets a folder of
    its own, the same results, and the ANN is trained once, by one of them, into one verified cache entry."""
    command = [sys.executable, "-m", "snnbench", "run", *RUN, f"cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir=${{new_folder:{tmp_path / 'runs' / 'same-second'}}}"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [stderr for _, stderr in outputs]
    folders = sorted(line.removeprefix("results in ") for _, stderr in outputs for line in stderr.splitlines()
                     if line.startswith("results in "))
    assert folders == [str(tmp_path / "runs" / "same-second"), str(tmp_path / "runs" / "same-second-2")]
    for name in ("accuracy.csv", "layers.csv"):
        first, second = (pd.read_csv(f"{folder}/{name}") for folder in folders)
        pd.testing.assert_frame_equal(first, second)
    summaries = [json.loads(open(f"{folder}/summary.json").read()) for folder in folders]
    for key in ("ann_accuracy", "snn_accuracy", "events_per_image", "checkpoint", "checkpoint_sha256"):
        assert summaries[0][key] == summaries[1][key]
    logs = [stderr for _, stderr in outputs]
    assert sum("training ANN" in log for log in logs) == 1 and sum("using cached ANN" in log for log in logs) == 1
    (entry,) = (tmp_path / "cache" / "ann").glob("*.pt")  # one entry, no training progress left
    record = json.loads(entry.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_of(entry) == summaries[0]["checkpoint_sha256"]
