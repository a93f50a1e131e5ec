"""One way to plug things in: a dataset, a conversion method, a simulation engine or an exporter of one's own is one
Python module plus one YAML, found from a folder outside snnbench (the configs through `hydra.searchpath`, the modules
from the working directory), run end to end through the CLI; a `_target_` that cannot be built is one line and exit
code 2. The shipped exporter `export=[snn]` writes a spiking network that load_snn reads back and that the torch
engine simulates to the run's accuracy.csv (which the plugged engine computed).

A new kind of plug-in is one more PLUGINS entry: its module, its YAML, the override that selects it and what the
run must show."""

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import in_this_process

import snnbench
from snnbench.app.exporters.snn import load_snn
from snnbench.app.pipeline import evaluated_images
from snnbench.io.data import build_splits, loader


@dataclass(frozen=True)
class Plugin:
    module: str                     # <module>.py, written to the working directory of the run
    source: str
    config: str                     # its YAML's path under conf/
    yaml: str
    override: str                   # what selects it on the command line
    check: Callable[[Path], None]   # what the run folder must show


RANDOM_IMAGES = '''
import torch
from dataclasses import dataclass
from pathlib import Path
from torch.utils.data import TensorDataset

from snnbench.io.data import DataSource, DataSplits


@dataclass(frozen=True, kw_only=True)
class RandomImages(DataSource):
    num_images: int = 20

    def splits(self, cache_dir):
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(self.num_images, self.channels, self.image_size, self.image_size, generator=generator)
        labels = torch.arange(self.num_images) % self.num_classes
        data = TensorDataset(images, labels)
        return DataSplits(data, data, data, [f"class {n}" for n in range(self.num_classes)])

    def files(self):
        return Path(__file__).parent, [Path(__file__)]  # the images are made by this code
'''

RANDOM_IMAGES_YAML = '''\
_target_: random_images.RandomImages
name: random_images
channels: 1
image_size: 6
num_classes: 2
mean: [0.5]
std: [0.3]
num_images: 20
'''


def random_images_run(run: Path):
    accuracy = pd.read_csv(run / "accuracy.csv")
    assert set(accuracy.dataset) == {"random_images"} and list(accuracy.t) == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_test_images"] == 20 and summary["dataset"] == "random_images"


SCALED_BASELINE = '''
from dataclasses import dataclass

from snnbench.conversion.methods import check_number, converted, spiking_copy
from snnbench.conversion.methods.baseline import Baseline


@dataclass(frozen=True)
class ScaledBaseline(Baseline):
    name: str = "scaled_baseline"
    scale: float = 1.0

    def validate(self):
        super().validate()
        check_number("scale", self.scale, positive=True, example=2)

    def convert(self, ann, calibration, batches, context):
        return converted(ann, calibration, spiking_copy(ann, calibration.thresholds, self.scale, v0=self.v0))
'''

SCALED_BASELINE_YAML = '''\
_target_: scaled_baseline.ScaledBaseline
name: scaled_baseline
scale: 1.5
'''


def scaled_baseline_run(run: Path):
    """Each spiking layer's threshold is 1.5 x the one calibrated, which the exported network keeps."""
    layers = pd.read_csv(run / "layers.csv").set_index("layer")
    calibrated = load_snn(run / "snn.pt").converted.conversion.calibration.thresholds
    assert set(layers.index) == set(calibrated)
    for name, threshold in calibrated.items():
        assert layers.threshold[name] == pytest.approx(1.5 * torch.as_tensor(threshold).mean().item()), name
    assert json.loads((run / "summary.json").read_text())["method"] == "scaled_baseline"


FIXED_CHUNK = '''
from dataclasses import dataclass

from snnbench.simulation.engines.torch import Torch


@dataclass(frozen=True)
class FixedChunk(Torch):
    name: str = "fixed_chunk"
    steps: int = 2  # folded into one batch at most, whatever sim.chunk asks

    def auto_preference(self, device):
        return None  # not torch's 0: auto would take it over torch on a tie (it comes first by name)

    def chunk(self, steps):
        return min(self.steps, steps)
'''

FIXED_CHUNK_YAML = '''\
_target_: fixed_chunk.FixedChunk
name: fixed_chunk
steps: 3
'''


def fixed_chunk_run(run: Path):
    """The run simulated with the plugged engine, its option from the YAML (T=4: a chunk of 3 steps, then 1); that
    it computes what torch does is test_the_exported_spiking_network_simulates_to_the_runs_accuracy's."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "fixed_chunk" and summary["chunk"] == 3
    assert summary["engine_options"] == {"_target_": "fixed_chunk.FixedChunk", "name": "fixed_chunk", "steps": 3}


RUN_NOTE = '''
from snnbench.io.files import atomic_write_bytes


class RunNote:
    def __init__(self, file: str, greeting: str):
        self.file, self.greeting = file, greeting

    def __call__(self, run):
        last = run.accuracy.iloc[-1]
        note = f"{self.greeting}: {run.converted.method.name} on {run.config.dataset.name}, t={last.t} {last.accuracy}"
        atomic_write_bytes(run.folder / self.file, note.encode())
'''

RUN_NOTE_YAML = '''\
# @package export.run_note
_target_: run_note.RunNote
file: note.txt
greeting: hello
'''


def run_note_run(run: Path):
    last = pd.read_csv(run / "accuracy.csv").iloc[-1]
    assert (run / "note.txt").read_text() == f"hello: scaled_baseline on random_images, t=4 {last.accuracy}"


PLUGINS = {
    "dataset": Plugin("random_images", RANDOM_IMAGES, "dataset/random_images.yaml", RANDOM_IMAGES_YAML,
                      "dataset=random_images", random_images_run),
    "method": Plugin("scaled_baseline", SCALED_BASELINE, "method/scaled_baseline.yaml", SCALED_BASELINE_YAML,
                     "method=scaled_baseline", scaled_baseline_run),
    "engine": Plugin("fixed_chunk", FIXED_CHUNK, "engine/fixed_chunk.yaml", FIXED_CHUNK_YAML, "engine=fixed_chunk",
                     fixed_chunk_run),
    "exporter": Plugin("run_note", RUN_NOTE, "export/run_note.yaml", RUN_NOTE_YAML, "export=[snn,run_note]",
                       run_note_run),
}
QUICK = ("sim.T=4", "train.epochs=1", "calibrate.batch_size=10", "calibrate.num_batches=1", "device=cpu")


def snnbench_run(folder: Path, *overrides, run="run", in_process=False):
    """`python -m snnbench run` in `folder` (its modules importable from the working directory), with the
    configs under folder/conf found through hydra.searchpath, into folder/<run>; `in_process`: in this process."""
    args = ["run", f"hydra.searchpath=[file://{folder / 'conf'}]", *overrides, f"hydra.run.dir={folder / run}",
            f"cache_dir={folder / 'cache'}"]
    if in_process:
        return in_this_process(args, cwd=folder)
    return subprocess.run([sys.executable, "-m", "snnbench", *args], cwd=folder, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    """A folder outside snnbench holding every plugin's module and, under conf/, its YAML."""
    folder = tmp_path_factory.mktemp("plugins")
    for plugin in PLUGINS.values():
        (folder / f"{plugin.module}.py").write_text(plugin.source)
        (folder / "conf" / plugin.config).parent.mkdir(parents=True, exist_ok=True)
        (folder / "conf" / plugin.config).write_text(plugin.yaml)
    return folder


@pytest.fixture(scope="module")
def plugged(plugins) -> Path:
    """The plugins' folder, with the run folder (run/) of one run that uses them all."""
    done = snnbench_run(plugins, *QUICK, *(plugin.override for plugin in PLUGINS.values()))
    assert done.returncode == 0, done.stderr
    return plugins


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_plugin_is_one_module_and_one_yaml(plugged, kind, monkeypatch):
    monkeypatch.syspath_prepend(str(plugged))  # the plugins' modules, which the run's snn.pt names
    PLUGINS[kind].check(plugged / "run")


def test_the_exported_spiking_network_simulates_to_the_runs_accuracy(plugged, monkeypatch):
    monkeypatch.syspath_prepend(str(plugged))  # the plugins' modules, which the saved config names
    run = plugged / "run"
    saved = load_snn(run / "snn.pt")
    cfg = saved.config
    assert (cfg.dataset.name, cfg.method.name, cfg.engine.name, cfg.sim.T) == ("random_images", "scaled_baseline",
                                                                               "fixed_chunk", 4)
    images = evaluated_images(cfg, build_splits(cfg.dataset, cfg.cache_dir))
    result = snnbench.simulate(saved.converted, loader(images, cfg.sim.batch_size), coding=cfg.sim.coding,
                               engine="torch", seed=cfg.seed, dataset=cfg.dataset.name)
    assert result.accuracy.to_csv(index=False) == (run / "accuracy.csv").read_text()
    assert result.layers.to_csv(index=False) == (run / "layers.csv").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("ann_accuracy", "snn_accuracy", "macs_per_image", "sops_per_image", "energy_ann_uj", "energy_snn_uj",
                "analog_fed_macs_per_image"):
        assert result.summary[key] == summary[key], key


ENGINE_CLASSES = "snnbench.simulation.backend.Backend or snnbench.simulation.engines.Auto"
BAD_TARGETS = {
    "dataset": (["dataset=random_images", "dataset._target_=random_images.NoSuchImages"],
                "dataset._target_=random_images.NoSuchImages names no subclass of snnbench.io.data.DataSource in "
                "random_images: name one (e.g. snnbench.io.data.MNISTSource)"),
    "dataset not a DataSource": (["dataset=random_images", "dataset._target_=run_note.RunNote"],
                                 "dataset._target_=run_note.RunNote names no subclass of snnbench.io.data.DataSource "
                                 "in run_note: name one (e.g. snnbench.io.data.MNISTSource)"),
    "dataset key the class lacks": (["dataset=digits", "dataset._target_=random_images.RandomImages"],
                                    "cannot build dataset._target_=random_images.RandomImages (RandomImages.__init__() "
                                    "got an unexpected keyword argument 'test_fraction'): give the dataset config the "
                                    "keys RandomImages takes"),
    "method": (["method=scaled_baseline", "method._target_=scaled_baseline.NoSuchBaseline"],
               "method._target_=scaled_baseline.NoSuchBaseline names no subclass of snnbench.conversion.methods.Method "
               "in scaled_baseline: name one (e.g. snnbench.conversion.methods.augmapping.AugMapping)"),
    "method not a Method": (["method=scaled_baseline", "method._target_=fixed_chunk.FixedChunk"],
                            "method._target_=fixed_chunk.FixedChunk names no subclass of "
                            "snnbench.conversion.methods.Method in fixed_chunk: name one (e.g. "
                            "snnbench.conversion.methods.augmapping.AugMapping)"),
    "engine": (["engine=fixed_chunk", "engine._target_=fixed_chunk.NoSuchChunk"],
               f"engine._target_=fixed_chunk.NoSuchChunk names no subclass of {ENGINE_CLASSES} in fixed_chunk: name "
               "one (e.g. snnbench.simulation.engines.torch.Torch)"),
    "engine not a Backend": (["engine=fixed_chunk", "engine._target_=scaled_baseline.ScaledBaseline"],
                             f"engine._target_=scaled_baseline.ScaledBaseline names no subclass of {ENGINE_CLASSES} in "
                             "scaled_baseline: name one (e.g. snnbench.simulation.engines.torch.Torch)"),
    "engine option the class lacks": (["engine=int8", "engine._target_=fixed_chunk.FixedChunk"],
                                      "engine int8 has no option min_depth: its options are name, steps"),
    "exporter": (["export=[run_note]", "export.run_note._target_=run_note.NoSuchNote"],
                 "cannot build export.run_note._target_=run_note.NoSuchNote (ImportError: Are you sure that "
                 "'NoSuchNote' is importable from module 'run_note'?): the target must be importable (from the working "
                 "directory or PYTHONPATH) and accept the keys given\n"),
    "exporter key the class lacks": (["export=[run_note]", "export.run_note._target_=random_images.RandomImages"],
                                     "cannot build export.run_note._target_=random_images.RandomImages (TypeError: "
                                     "RandomImages.__init__() got an unexpected keyword argument 'file'): the target "
                                     "must be importable (from the working directory or PYTHONPATH) and accept the "
                                     "keys given\n"),
    "exporter not callable": (["export=[run_note]", "export.run_note._target_=builtins.dict"],
                              "export.run_note._target_=builtins.dict built a dict, which cannot be called with the "
                              "run's products: give it a __call__(self, run) method"),
}


@pytest.mark.parametrize("overrides, message", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_a_target_that_cannot_be_built_is_one_line(plugins, overrides, message):
    done = snnbench_run(plugins, *QUICK, *overrides, run="bad", in_process=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == f"error: {message.rstrip()}\n"
    assert not (plugins / "bad" / "summary.json").exists()
