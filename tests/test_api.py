"""The Python API (snnbench.convert / simulate / inspect, snnbench.methods): the example runs without Hydra, Typer
or rich; the API gives `snnbench run`'s numbers on the same model and images, and snnbench.convert is its finer
steps composed; knobs by keyword or by object; bad knobs refused by name; a method by name (presets too) is the
method the run builds from the same YAML."""

import json
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import snnbench
from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.core.counts import AC_PJ, MAC_PJ
from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.io.checkpoints import load_checkpoint
from snnbench.io.data import build_splits, loader, seeded_subset
from snnbench.models import ConvNet
from snnbench.models.qcfs import QCFS
from snnbench.models.spikezip import SpikeZIPQuantizer

ROOT = CONF_DIR.parent


# The API used in a fresh process (what a notebook does), then the example. The example's own import of scikit-learn
# may bring rich with it (scikit-learn's callbacks use it), so the API's imports are listed before.
API_THEN_EXAMPLE = """
import runpy, sys
import torch, snnbench
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
images, labels = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
result = snnbench.simulate(snnbench.convert(model, "augmapping", images, T=4), [(images, labels)])
snnbench.inspect(model, input_shape=(1, 8, 8))
print("imported:", sorted(name for name in ("hydra", "typer", "rich") if name in sys.modules))
runpy.run_path("examples/api.py", run_name="__main__")
"""


def test_the_api_imports_no_hydra_typer_or_rich_and_the_example_runs():
    done = subprocess.run([sys.executable, "-c", API_THEN_EXAMPLE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "imported: []"
    assert lines[1].split() == ["t", "accuracy", "events_per_image", "sops_per_image"]
    assert [int(line.split()[0]) for line in lines[2:10]] == list(range(1, 9))
    assert lines[10].startswith("ANN ") and "SNN" in lines[10]
    assert lines[11].split()[:5] == ["layer", "origin", "output_shape", "neurons", "fan_out"]


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def tiny_data(n=48):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_knobs_by_keyword_and_by_object_give_the_same_result():
    model, (images, labels) = tiny_model(), tiny_data()
    batches = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 48, 16)]
    by_keyword = snnbench.convert(model, "augmapping", images, T=6, c_max=2, threshold_scale=0.5)
    by_object = snnbench.convert(model, snnbench.methods.AugMapping(c_max=2, threshold_scale=0.5), images, T=6)
    assert by_keyword.method == by_object.method == snnbench.methods.AugMapping(c_max=2, threshold_scale=0.5)
    assert {neuron.c_max for neuron in by_keyword.snn.modules() if isinstance(neuron, IFNeuron)} == {2}
    first, second = snnbench.simulate(by_keyword, batches), snnbench.simulate(by_object, iter(batches))
    pd.testing.assert_frame_equal(first.accuracy, second.accuracy)
    pd.testing.assert_frame_equal(first.layers, second.layers)
    assert first.accuracy.t.tolist() == list(range(1, 7)) and first.summary["num_test_images"] == 48
    # SOPs are events x fan-out, and the energies follow the default picojoules of conf/config.yaml or those given
    assert first.layers.sops_per_image.sum() == pytest.approx(first.summary["sops_per_image"])
    macs = sum(by_keyword.macs.values())
    assert macs == 4 * 9 * 64 + 64 * 16 + 16 * 10
    assert first.summary["energy_ann_uj"] == pytest.approx(macs * MAC_PJ * 1e-6)
    first_layer = 4 * 9 * 64  # direct coding: the first conv multiplies the analog image once
    assert first.summary["energy_snn_uj"] == pytest.approx((first.summary["sops_per_image"] * AC_PJ
                                                           + first_layer * MAC_PJ) * 1e-6)
    cheaper = snnbench.simulate(by_keyword, batches, mac_pj=1.0, ac_pj=0.1)
    assert cheaper.summary["energy_ann_uj"] == pytest.approx(macs * 1e-6)
    assert cheaper.summary["energy_snn_uj"] == pytest.approx((first.summary["sops_per_image"] * 0.1
                                                              + first_layer) * 1e-6)


@pytest.mark.parametrize("name", snnbench.methods.available())
def test_every_method_converts_through_the_api(name):
    """What each method reads of the run (its knobs, T, the calibration percentile, the seed) reaches it; scored on
    the ANN's own predictions, the ANN is right on every image."""
    model = tiny_model()
    if name == "qcfs":  # an ANN trained with QCFS activations: their lambda becomes the threshold
        model[2], model[6] = QCFS(levels=4, threshold=2.0), QCFS(levels=4, threshold=3.0)
    if name == "spikezip":  # an ANN trained quantised: the quantisers' steps become the thresholds
        model[2], model[6] = SpikeZIPQuantizer(8, signed=False, scale=2.0), SpikeZIPQuantizer(8, False, scale=3.0)
    images = tiny_data()[0]
    with torch.no_grad():
        labels = model(images).argmax(1)
    nonlinear = "compensate" if snnbench.methods.named(name).needs_analog_operators else "refuse"
    result = snnbench.simulate(snnbench.convert(model, name, images, T=4, nonlinear=nonlinear), [(images, labels)])
    assert result.accuracy.method.unique().tolist() == [name] and result.accuracy.t.tolist() == [1, 2, 3, 4]
    assert result.summary["ann_accuracy"] == 1.0
    assert result.layers.layer.tolist() == ["2", "6"] and (result.layers.threshold > 0).all()
    if name in ("qcfs", "spikezip"):
        assert result.layers.threshold.tolist() == [2.0, 3.0]


def test_the_default_energies_are_the_configs(cfg):
    assert (cfg.energy.mac_pj, cfg.energy.ac_pj) == (MAC_PJ, AC_PJ)


@pytest.mark.parametrize("call, named", [
    (lambda model, images: snnbench.convert(model, "augmapping", images, T=4, c_max=0), "method.c_max"),
    (lambda model, images: snnbench.convert(model, "augmapping", images, T=4, cmax=2), "no knob cmax"),
    (lambda model, images: snnbench.convert(model, "augmapping", images, T=4, threshold_scale=float("nan")),
     "method.threshold_scale must be a positive finite number, got nan"),
    (lambda model, images: snnbench.methods.Baseline(v0=float("inf")), "method.v0 must be a finite number, got inf"),
    (lambda model, images: snnbench.convert(model, "augmapping", images, T=0), "T must be a positive integer"),
    (lambda model, images: snnbench.convert(model, "nosuch", images, T=4), "unknown method 'nosuch'"),
    (lambda model, images: snnbench.convert(model, "baseline", images, T=4, percentile=0), "percentile must be in"),
    (lambda model, images: snnbench.methods.TTRBR(restructure="twice"), "method.restructure"),
    (lambda model, images: snnbench.methods.Calibration(momentum=1.5), "method.momentum"),
    (lambda model, images: snnbench.methods.named("burst", c_max=0), "method.c_max must be a positive integer"),
    (lambda model, images: snnbench.methods.AugMapping(name="a/b"), "method.name must be a name of letters"),
    (lambda model, images: snnbench.convert(model, snnbench.methods.Baseline(), images, T=4, cmax=2),
     "method baseline has no knob cmax: its knobs are name, v0"),
    (lambda model, images: snnbench.convert(model, "snm", images, T=4, c_max=2), "method snm has no knob c_max"),
])
def test_a_bad_knob_is_a_user_error_naming_it(call, named):
    with pytest.raises(UserError, match=named):
        call(tiny_model(), tiny_data()[0])


# what only a run gives: the options whose YAML takes a value from another group (trained_with: ${train.activation})
RUN_GIVES = {"qcfs": ["train.activation=qcfs"], "spikezip": ["train.activation=spikezip"]}


@pytest.mark.parametrize("name", snnbench.methods.available())
def test_a_method_by_name_is_the_one_the_run_builds_from_the_same_yaml(name):
    """snnbench.methods.named reads conf/method/<name>.yaml without Hydra (a preset merged over the YAML it builds
    on); the knobs whose YAML value is a run's interpolation (T: ${sim.T}) keep the class's default, which means
    the same (None: the T given to convert)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}", *RUN_GIVES.get(name, [])])
    run = pipeline.method_of(cfg)
    by_name = snnbench.methods.named(name)
    assert type(by_name) is type(run) and by_name.name == name
    interpolated = [key for key in cfg.method if OmegaConf.is_interpolation(cfg.method, key)]
    defaults = type(run)(name=name)
    assert by_name == replace(run, **{key: getattr(defaults, key) for key in interpolated})
    if name == "calibration":
        assert run.T == cfg.sim.T and by_name.T is None


def test_the_presets_are_yaml_only():
    """burst, snm and calibration_advanced are AugMapping, TerMapping and Calibration under names of their own."""
    assert snnbench.methods.named("burst") == snnbench.methods.AugMapping(
        name="burst", c_max=2, v0=0.0, neg_threshold=None, threshold_scale=1.0)
    assert snnbench.methods.named("snm") == snnbench.methods.TerMapping(name="snm", per_neuron=True)
    assert snnbench.methods.named("calibration_advanced", correction_images=64) == snnbench.methods.Calibration(
        name="calibration_advanced", bias_correction=False, potential_correction=True, correction_images=64)


def test_convert_is_its_finer_steps_composed():
    """snnbench.convert = canonical, calibrate, convert_canonical, converted_of: the steps `snnbench run` calls
    between its cache stages give the same network, bit for bit."""
    model, (images, labels) = tiny_model(), tiny_data()
    whole = snnbench.convert(model, "ttrbr", images, T=5, percentile=99.0, seed=3)
    ann = snnbench.canonical(model)
    calibration = snnbench.calibrate(ann, images, percentile=99.0, seed=3)
    conversion = snnbench.convert_canonical(ann, "ttrbr", calibration, images, T=5, percentile=99.0, seed=3)
    steps = snnbench.converted_of(conversion, ann, snnbench.methods.TTRBR(), images[:128], T=5, model="Sequential")
    assert steps.macs == whole.macs and steps.conversion.diagnostics == whole.conversion.diagnostics
    first, second = snnbench.simulate(whole, [(images, labels)]), snnbench.simulate(steps, [(images, labels)])
    pd.testing.assert_frame_equal(first.accuracy, second.accuracy)
    pd.testing.assert_frame_equal(first.layers, second.layers)
    assert first.counts == second.counts


def test_inspect_reads_the_model_as_the_cli_does():
    found = snnbench.inspect(tiny_model(), input_shape=(1, 8, 8))
    assert found.layers.layer.tolist() == ["2", "6"]
    assert found.layers.output_shape.tolist() == [(4, 8, 8), (16,)]
    assert found.layers.neurons.tolist() == [256, 16]
    # fan-out: the next conv or linear layer's synapses per neuron (average pooling is linear, so it passes through)
    assert found.layers.fan_out.tolist() == [16.0, 10.0]
    assert found.folded == ["1 -> 0"] and found.removed == [] and found.neurons == 272


def test_the_api_gives_the_cli_accuracy_on_the_same_model_and_images(tmp_path, cfg):
    """An MLP trained here on digits, saved as a checkpoint; `snnbench run` loads it (train.checkpoint) and scores
    AugMapping at every t on 100 test images. The API, given the same weights, the same calibration images and the
    same test images (drawn with the library's seeded functions, as the run draws them), gives the same
    accuracy.csv, thresholds and summary numbers."""
    splits = build_splits(cfg.dataset)
    model = ConvNet(layers=[], hidden=[128, 64], in_channels=1, image_size=8, num_classes=10, mean=[0.305],
                    std=[0.376])  # conf/model/mlp.yaml on conf/dataset/digits.yaml
    images, labels = next(iter(loader(splits.train, len(splits.train))))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    checkpoint = tmp_path / "mlp.pt"
    torch.save(model.eval().state_dict(), checkpoint)

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "snnbench", "run", "method=augmapping", "method.c_max=3", "sim.T=6",
                           f"train.checkpoint={checkpoint}", "sim.num_samples=100", f"hydra.run.dir={out}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    run_accuracy = pd.read_csv(out / "accuracy.csv")
    assert summary["ann_accuracy"] > 0.8 and run_accuracy.accuracy.iloc[-1] > 0.5  # trained, not chance

    calibration = [images for images, _ in loader(splits.calibration, 128, shuffle=True, seed=0, limit=4 * 128)]
    tested = loader(seeded_subset(splits.test, 100, seed=0), 64)
    conversion = snnbench.convert(load_checkpoint(model, checkpoint), "augmapping", calibration, T=6, c_max=3)
    result = snnbench.simulate(conversion, tested, dataset="digits")

    assert result.accuracy.accuracy.tolist() == run_accuracy.accuracy.tolist()
    for column in ("t", "events_per_image", "spike_units_per_image", "sops_per_image"):
        assert result.accuracy[column].tolist() == run_accuracy[column].tolist(), column
    run_layers = pd.read_csv(out / "layers.csv")
    assert result.layers.threshold.tolist() == run_layers.threshold.tolist()
    for key in ("ann_accuracy", "snn_accuracy", "macs_per_image", "sops_per_image", "energy_ann_uj", "energy_snn_uj"):
        assert result.summary[key] == summary[key], key
