"""The conversion methods through the real pipeline (digits MLP, trained for one epoch, cached per test)."""

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.conversion.methods import Context
from snnbench.core.calibrate import calibrate
from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.methods import AugMapping, named
from snnbench.simulation.backend import spiking_layers


@pytest.fixture
def run_method(tmp_path):
    """Run the whole pipeline with the given overrides; return (accuracy.csv, layers.csv) as DataFrames."""
    def run(name, *overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"cache_dir={tmp_path / 'cache'}", "train.epochs=1", "sim.T=12", "sim.num_samples=150", *overrides])
        out = tmp_path / name
        pipeline.run(cfg, out)
        return pd.read_csv(out / "accuracy.csv"), pd.read_csv(out / "layers.csv")
    return run


def test_augmapping_with_cmax_1_is_termapping_bit_for_bit(run_method):
    ternary = run_method("ter", "method=termapping", "method.neg_threshold=0.5")
    augmented = run_method("aug", "method=augmapping", "method.c_max=1", "method.neg_threshold=0.5",
                           "method.threshold_scale=1.0", "method.v0=0.0")
    baseline = run_method("base", "method=baseline")
    assert ternary[0].drop(columns="method").equals(augmented[0].drop(columns="method"))  # accuracy.csv
    assert ternary[1].equals(augmented[1])                                                # layers.csv
    # not vacuous: the negative spikes change the counts relative to the baseline on the same ANN
    assert not ternary[0].events_per_image.equals(baseline[0].events_per_image)
    # ternary and c_max=1 spikes carry one unit each
    assert ternary[0].events_per_image.equals(ternary[0].spike_units_per_image)


def test_unlimited_augmented_spikes_carry_more_units_than_events(run_method):
    accuracy, layers = run_method("aug", "method=augmapping", "method.threshold_scale=0.25")
    assert (accuracy.spike_units_per_image > accuracy.events_per_image).all()
    assert (layers.spike_units_per_image >= layers.events_per_image).all()
    # SOPs are events (not spike units) times fan-out: an augmented spike is one synaptic message. The digits
    # MLP (hidden 128, 64) sends each hidden-1 neuron to 64 targets and each hidden-2 neuron to 10 classes.
    expected = layers.events_per_image * [64, 10]
    assert layers.sops_per_image.tolist() == pytest.approx(expected.tolist())
    assert accuracy.sops_per_image.iloc[-1] == pytest.approx(expected.sum())


def convert(name, **knobs):
    """Calibrate a small random MLP and convert it with the method conf/method/<name>.yaml builds, knobs set."""
    ann = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 10))
    images = [torch.rand(50, 1, 8, 8)]
    calibration = calibrate(ann, images, 99.9, False, "cpu")
    method = named(name, **knobs)
    return calibration, method, spiking_layers(method.convert(ann, calibration, images, Context(8, 99.9, 0)).snn)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_threshold_scale_scales_every_threshold(scale):
    calibration, _, neurons = convert("augmapping", threshold_scale=scale)
    assert set(neurons) == set(calibration.thresholds) and len(neurons) == 2
    for name, neuron in neurons.items():
        torch.testing.assert_close(neuron.threshold, scale * calibration.thresholds[name])


@pytest.mark.parametrize(("name", "c_max", "neg_threshold"), [
    ("baseline", 1, None), ("termapping", 1, 1.0), ("augmapping", None, 1.0)])
def test_each_method_builds_its_neuron_on_the_calibrated_thresholds(name, c_max, neg_threshold):
    calibration, method, neurons = convert(name)
    scale = method.threshold_scale if isinstance(method, AugMapping) else 1.0
    for layer, neuron in neurons.items():
        assert isinstance(neuron, IFNeuron)
        assert (neuron.c_max, neuron.neg_threshold, neuron.v0) == (c_max, neg_threshold, method.v0)
        torch.testing.assert_close(neuron.threshold, scale * calibration.thresholds[layer])


def test_a_conversion_is_cached_and_a_rerun_gives_the_same_results(run_method, caplog, tmp_path):
    first = run_method("first", "method=ttrbr", "sim.T=6")
    with caplog.at_level("INFO", logger="snnbench"):
        again = run_method("again", "method=ttrbr", "sim.T=6")
    assert "using cached conversion" in caplog.text
    assert first[0].equals(again[0]) and first[1].equals(again[1])
    entries = list((tmp_path / "cache" / "conversion").glob("ttrbr_*.pt"))
    assert len(entries) == 1
    with caplog.at_level("INFO", logger="snnbench"):
        run_method("other_T", "method=ttrbr", "sim.T=5")  # tuned for another T: another entry
    assert len(list((tmp_path / "cache" / "conversion").glob("ttrbr_*.pt"))) == 2


@pytest.mark.parametrize(("override", "message"), [
    ("method.scales=[]", "method.scales must be a non-empty list of positive numbers"),
    ("method.scales=[1,-2]", "method.scales must be a non-empty list of positive numbers"),
    ("method.tune=maybe", "method.tune must be true or false, got 'maybe'"),
    ("method.v0=high", "method.v0 must be a finite number, got 'high'"),
])
def test_a_method_checks_its_own_knobs(override, message):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=ttrbr", override])
    with pytest.raises(UserError, match=message):
        pipeline.validate(cfg)  # the run builds TTRBR from cfg.method: its construction checks the knob


def test_a_preset_keeps_its_own_name_in_the_results(run_method, tmp_path):
    """burst is AugMapping under another name: its results say burst, and they are AugMapping's with burst's
    knobs, bit for bit."""
    burst = run_method("burst", "method=burst")
    same = run_method("aug", "method=augmapping", "method.c_max=2", "method.v0=0.0", "method.neg_threshold=null",
                      "method.threshold_scale=1.0")
    assert burst[0].method.unique().tolist() == ["burst"] and same[0].method.unique().tolist() == ["augmapping"]
    assert burst[0].drop(columns="method").equals(same[0].drop(columns="method"))
    assert burst[1].equals(same[1])
    assert [entry.name.split("_")[0] for entry in (tmp_path / "cache" / "conversion").glob("*.pt")].count("burst") == 1


def test_the_run_gives_a_method_the_runs_T_unless_its_own_knob_says():
    """calibration's YAML sets T: ${sim.T}; a run resolves it, and the Context carries sim.T for a method made in
    Python (T=None)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=calibration", "sim.T=7"])
        pinned = compose(config_name="config", overrides=["method=calibration", "sim.T=7", "method.T=3"])
    assert pipeline.method_of(cfg) == named("calibration", T=7)
    assert pipeline.method_of(pinned).T == 3
    ann = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    images = [torch.rand(20, 1, 8, 8)]
    calibration = calibrate(ann, images, 99.9, False, "cpu")

    def shift(method, T):  # the input current theta / (2T) of the shift, for the T the method calibrates for
        neuron = spiking_layers(method.convert(ann, calibration, images, Context(T, 99.9, 0)).snn)["2"]
        return (neuron.bias / neuron.threshold).item()

    assert shift(named("calibration", bias_correction=False), 7) == pytest.approx(1 / 14)
    assert shift(named("calibration", bias_correction=False, T=3), 7) == pytest.approx(1 / 6)
