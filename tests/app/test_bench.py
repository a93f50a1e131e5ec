import os
import sys

import pandas as pd
import pytest
import torch
from helpers import snnbench

from snnbench.app.bench import COLUMNS, Unsupported, Workload, _spikingjelly, run_bench
from snnbench.errors import UserError
from snnbench.models.resnet import ResNet
from snnbench.simulation.integer_conv import int8_conv_available


def test_bench_writes_one_row_per_engine(tmp_path):
    out = tmp_path / "bench.csv"
    done = snnbench("bench", "sim.T=4", "train.epochs=1", "bench.batches=1", "bench.warmup=0", "bench.repeats=1",
                    f"cache_dir={tmp_path / 'cache'}", "--out", str(out), env={**os.environ, "COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(out)
    assert list(frame.columns) == COLUMNS
    # bench.engines=null: every engine of conf/engine (auto is a choice, not an engine), then the two peers
    assert frame.engine.tolist() == ["int8", "reference", "torch", "triton", "ann_floor", "spikingjelly"]
    rows = frame.set_index("engine")
    measured = ["torch", "reference", "ann_floor"] + (["int8"] if int8_conv_available() else [])
    for engine in measured:
        assert rows.image_steps_per_s[engine] > 0 and rows.peak_mem_mb[engine] >= 0
        assert rows.accuracy[engine] == rows.accuracy["reference"] or engine == "ann_floor"
    assert rows.ratio_to_floor["ann_floor"] == 1.0
    assert "torch and the step-by-step reference: identical correct counts at every t" in done.stderr
    # the fused kernel runs on CUDA: on this CPU its row says why it is empty
    assert pd.isna(rows.image_steps_per_s["triton"])
    assert "triton: unavailable: engine=triton runs on CUDA devices" in done.stderr
    # the engine the run chose (engine=auto: torch on this CPU without AMX) is marked
    assert "(engine=auto)" in done.stderr
    # SpikingJelly is an optional extra: measured when installed, else the row says so and stays empty
    if pd.isna(rows.image_steps_per_s["spikingjelly"]):
        assert "not installed" in done.stderr
    else:
        assert 0 <= rows.accuracy["spikingjelly"] <= 1
    assert (frame[["model", "T", "batch_size", "device"]].iloc[0] == ["mlp", 4, 64, "cpu"]).all()


def workload(model) -> Workload:
    images = torch.rand(4, 3, 32, 32)
    return Workload(ann=model.eval(), snn=model, batches=[(images, torch.arange(4))],
                    calibration=[images], T=2, sub_batch=4, chunk=2, channels_last=False, engines={},
                    coding="direct", device="cpu", seed=0)


def test_spikingjelly_refuses_option_a_resnets_with_a_reason():
    pytest.importorskip("spikingjelly.activation_based.ann2snn")
    model = ResNet(8, in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(Unsupported, match="unsupported: .*pad"):
        _spikingjelly(workload(model))


def test_spikingjelly_not_installed_is_a_status(monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly", None)
    monkeypatch.setitem(sys.modules, "spikingjelly.activation_based", None)
    with pytest.raises(Unsupported, match=r"not installed: pip install -e '\.\[peers\]'"):
        _spikingjelly(workload(ResNet(8, in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("engines", ["snnbench", "bogus"], "bench.engines must list some of"),
    ("repeats", 0, "bench.repeats must be a positive integer"),
    ("warmup", -1, "bench.warmup must be a non-negative integer"),
])
def test_bad_bench_settings_are_refused_before_any_work(cfg, key, value, message):
    cfg.bench[key] = value
    with pytest.raises(UserError, match=message):
        run_bench(cfg, None)
