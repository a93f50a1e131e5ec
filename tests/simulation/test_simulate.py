import json
import os
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from helpers import snnbench
from torch import nn

from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.simulation import engines
from snnbench.simulation.backend import Settings
from snnbench.simulation.engines.int8 import Int8
from snnbench.simulation.engines.reference import Reference
from snnbench.simulation.engines.torch import Torch
from snnbench.simulation.engines.triton import Triton
from snnbench.simulation.integer_conv import cpu_has_amx, int8_conv_available
from snnbench.simulation.simulate import choose_chunk, choose_sub_batch, engine_settings, memory_budget_mb, simulate


def simulate_step_by_step(model, batches, T, **settings):
    return simulate(model, batches, T, 1, engine="reference", **settings)


def batches(n=3, batch=5, shape=(1, 6, 6)):
    torch.manual_seed(1)
    return [(torch.rand(batch, *shape), torch.randint(0, 4, (batch,))) for _ in range(n)]


def spiking_net(**knobs):
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), IFNeuron(torch.tensor(0.6), **knobs), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(36, 16), IFNeuron(torch.full((16,), 0.5), **knobs), nn.Linear(16, 4))


@pytest.mark.parametrize("knobs", [{}, {"neg_threshold": 1.0}, {"c_max": None, "neg_threshold": 1.0, "v0": 0.5}])
@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_one_simulation_equals_step_by_step_reference(knobs, coding):
    data, T = batches(), 9
    reference = simulate_step_by_step(spiking_net(**knobs), data, T, coding=coding, seed=3)
    assert all(events.sum() > 0 for events in reference.events.values())
    for chunk in (2, 4, 9):
        folded = simulate(spiking_net(**knobs), data, T, chunk, coding=coding, seed=3)
        assert torch.equal(folded.correct, reference.correct)
        for name in reference.events:
            assert torch.equal(folded.events[name], reference.events[name])
            assert torch.equal(folded.units[name], reference.units[name])


@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_parts_of_each_batch_at_a_time_give_the_reference_results(coding):
    data, T = batches(batch=7), 9
    reference = simulate_step_by_step(spiking_net(), data, T, coding=coding, seed=3, sub_batch=3)
    parts = simulate(spiking_net(), data, T, 4, coding=coding, seed=3, sub_batch=3)  # 3 + 3 + 1 images
    assert torch.equal(parts.correct, reference.correct) and parts.num_images == 21
    for name in reference.events:
        torch.testing.assert_close(parts.events[name], reference.events[name])
    if coding == "direct":  # every image alike, whatever the parts (Poisson draws follow them)
        whole = simulate(spiking_net(), data, T, 4)
        assert torch.equal(parts.correct, whole.correct) and torch.equal(parts.events["1"], whole.events["1"])


@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_blocks_simulated_at_once_by_threads_of_their_own_give_the_same_results(coding):
    data, T = batches(n=3, batch=7), 9
    results, threads = [], torch.get_num_threads()
    for blocks in (1, 3):
        simulation = Torch().prepare(spiking_net(), Settings(T, 4, coding, seed=3, sub_batch=2,
                                                                          threads=blocks))
        assert len(simulation.modules) == blocks
        assert len({id(neuron) for graph in simulation.neurons for neuron in graph.values()}) == 2 * blocks
        results.append(simulation.run(data))
        assert torch.get_num_threads() == threads
    one, three = results
    assert torch.equal(one.correct, three.correct) and one.num_images == three.num_images == 21
    for name in one.events:
        assert one.events[name].sum() > 0
        assert torch.equal(one.events[name], three.events[name]) and torch.equal(one.units[name], three.units[name])


def test_hooks_on_the_networks_neurons_see_a_simulation_of_one_block():
    net, seen = spiking_net(), []
    net[1].register_forward_pre_hook(lambda neuron, args: seen.append(args[0].shape))
    simulate(net, batches(n=1), 6, 3)
    assert seen == [(5, 4, 6, 6)] * 2  # the first layer's constant current, once per chunk


def test_sub_batch_is_at_most_the_batch():
    assert choose_sub_batch("auto", 64, "cpu") == 16
    assert choose_sub_batch("auto", 64, "cuda") == 64  # whole batches on a GPU
    assert choose_sub_batch(32, 8, "cpu") == 8


@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_channels_last_layout_gives_the_reference_results(coding):
    data, T = batches(), 9
    reference = simulate_step_by_step(spiking_net(neg_threshold=1.0), data, T, coding=coding, seed=3)
    nhwc = simulate(spiking_net(neg_threshold=1.0), data, T, 4, coding=coding, seed=3, layout=torch.channels_last)
    assert torch.equal(nhwc.correct, reference.correct)
    for name in reference.events:
        torch.testing.assert_close(nhwc.events[name], reference.events[name])
        torch.testing.assert_close(nhwc.units[name], reference.units[name])


class CountingConv(nn.Conv2d):
    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_with_direct_coding_the_first_layer_computes_once_per_batch(coding):
    net, data = spiking_net(), batches()
    first, net[0] = net[0], CountingConv(1, 4, 3, padding=1)
    net[0].load_state_dict(first.state_dict())
    net[0].calls = 0
    modules = list(net.named_modules())
    result = simulate(net, data, 8, chunk=2, coding=coding, seed=3)
    assert net[0].calls == len(data) * (1 if coding == "direct" else 4)  # 4 chunks per batch
    assert list(net.named_modules()) == modules and "forward" not in net[0].__dict__  # the network as it was
    same = simulate(spiking_net(), data, 8, chunk=2, coding=coding, seed=3)
    assert torch.equal(result.correct, same.correct) and torch.equal(result.events["1"], same.events["1"])


def test_accuracy_curve_from_one_run_equals_shorter_runs():
    data = batches()
    full = simulate(spiking_net(), data, 12, chunk=4)
    for T in (1, 5, 12):
        short = simulate(spiking_net(), data, T, chunk=3)
        assert torch.equal(short.correct, full.correct[:T])
        assert torch.equal(short.events["1"], full.events["1"][:T])


def test_chunk_respects_memory_budget():
    assert choose_chunk("auto", 64, 64, 10_000, 1e9, "cpu") >= 1
    assert choose_chunk(32, 64, 64, 10_000_000, 100, "cpu") == 1
    assert choose_chunk(32, 8, 1, 10, 1e9, "cpu") == 8


def test_memory_budget_defaults_to_half_the_free_memory():
    assert memory_budget_mb(512, "cpu") == 512
    assert 0 < memory_budget_mb(None, "cpu") <= psutil.virtual_memory().total / 2**21
    huge = psutil.virtual_memory().total // 4  # float32 elements per image: one step needs 2x the whole RAM
    assert choose_chunk(32, 64, 1, huge, None, "cpu") == 1


def test_every_engine_yaml_builds_its_class_with_the_classs_defaults():
    """conf/engine/<name>.yaml names its class by `_target_`, under its own name, with every option the class has
    at the class's default: the options in code and in conf/ cannot drift apart."""
    assert engines.names() == ["auto", "int8", "reference", "torch", "triton"]
    for name, config in engines.configs().items():
        engine = engines.build_engine(config)
        assert engine.name == name
        assert engines.config_of(engine) == config == engines.config_of(type(engine)())


def test_an_engine_refuses_options_it_does_not_have_or_values_out_of_range():
    with pytest.raises(UserError, match="^engine int8 has no option chunk: its options are name, min_depth$"):
        engines.named("int8", chunk=4)
    with pytest.raises(UserError, match=r"^engine.min_depth must be auto or a non-negative integer \(0: every "
                                        r"spike-fed layer in integers\), got -1$"):
        engines.named("int8", min_depth=-1)
    with pytest.raises(UserError, match="^unknown engine 'fast': choose one of auto, int8, reference, torch, triton$"):
        engines.resolve("fast", "cpu")


def test_auto_takes_the_engine_each_device_prefers_and_a_named_one_must_run_there(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    int8_here = cpu_has_amx() and int8_conv_available()
    assert engines.resolve("auto", "cpu") == (Int8() if int8_here else Torch())  # this CPU has no AMX: torch
    assert engines.resolve("auto", "cuda") == Triton()  # Triton ships with the CUDA build of torch
    assert engines.resolve("reference", "cpu") == Reference()
    if int8_conv_available():
        monkeypatch.setattr("snnbench.simulation.engines.int8.cpu_has_amx", lambda: True)
        assert engines.resolve("auto", "cpu") == Int8()  # measured faster there
        assert engines.resolve(Int8(min_depth=0), "cpu").integer_min_depth == 0
    for engine, device, message in [
        ("triton", "cpu", r"^engine=triton runs on CUDA devices \(device here: cpu\): set device=cuda, or "
                          "TRITON_INTERPRET=1"),
        ("int8", "cuda", "^engine=int8 needs device=cpu"),
    ]:
        with pytest.raises(UserError, match=message):
            engines.resolve(engine, device)


def test_the_reference_engine_steps_one_at_a_time_whatever_chunk_is_asked():
    sim = SimpleNamespace(sub_batch="auto", batch_size=5, chunk=8, T=12, max_memory_mb=None, channels_last=False)
    image = torch.rand(1, 1, 6, 6)
    assert engine_settings(Reference(), sim, spiking_net(), image, "cpu").chunk == 1
    assert engine_settings(Torch(), sim, spiking_net(), image, "cpu").chunk == 8


# an engine of a user's, outside snnbench: the torch engine under another name, which auto would prefer to every
# other where it runs, and that says why it cannot run where UNAVAILABLE is set
USER_ENGINE = """
import os
from dataclasses import dataclass

from snnbench.simulation.engines.torch import Torch


@dataclass(frozen=True)
class Mine(Torch):
    name: str = "mine"

    def unavailable(self, device):
        return "engine=mine needs MINE_READY=1" if os.environ.get("MINE_READY") != "1" else None

    def auto_preference(self, device):
        return 100
"""


def user_engine(folder: Path) -> Path:
    """A module my_engine.py in `folder` and its YAML in folder/conf/engine/: the config folder."""
    (folder / "my_engine.py").write_text(USER_ENGINE)
    (folder / "conf" / "engine").mkdir(parents=True)
    (folder / "conf" / "engine" / "mine.yaml").write_text("_target_: my_engine.Mine\nname: mine\n")
    return folder / "conf"


def test_auto_considers_an_engine_added_from_a_folder_of_ones_own_and_skips_it_where_it_cannot_run(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    folders = [engines.ENGINE_DIR, user_engine(tmp_path) / "engine"]
    assert engines.names(folders) == ["auto", "int8", "mine", "reference", "torch", "triton"]
    monkeypatch.delenv("MINE_READY", raising=False)
    with pytest.raises(UserError, match="^engine=mine needs MINE_READY=1$"):
        engines.resolve("mine", "cpu", folders)
    without_it = engines.resolve("auto", "cpu")
    assert engines.resolve("auto", "cpu", folders) == without_it
    monkeypatch.setenv("MINE_READY", "1")
    assert engines.resolve("auto", "cpu", folders).name == "mine"
    assert engines.resolve("auto", "cpu") == without_it  # conf/engine alone does not know it
    data = batches()
    mine = simulate(spiking_net(), data, 9, 4, engine=engines.named("mine", folders))
    folded = simulate(spiking_net(), data, 9, 4, engine="torch")
    assert torch.equal(mine.correct, folded.correct)
    assert all(torch.equal(mine.events[name], folded.events[name]) for name in folded.events)


def test_an_engine_from_a_folder_of_ones_own_runs_by_name_on_the_command_line_as_torch_does(tmp_path):
    """A module on PYTHONPATH and a YAML in a config folder given by hydra.searchpath: `engine=mine` simulates as
    the torch engine it derives from, byte for byte; an unknown name lists it among the others."""
    conf = user_engine(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MINE_READY": "1"}
    common = ["run", "sim.T=4", "train.epochs=1", "sim.num_samples=40", f"hydra.searchpath=[file://{conf}]",
              f"cache_dir={tmp_path / 'cache'}"]
    unknown = snnbench(*common, "engine=nosuch", f"hydra.run.dir={tmp_path / 'nosuch'}", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: unknown engine 'nosuch': choose one of auto, int8, mine, reference, "
                                      "torch, triton")
    for engine in ("torch", "mine"):
        done = snnbench(*common, f"engine={engine}", f"hydra.run.dir={tmp_path / engine}", env=env)
        assert done.returncode == 0, done.stderr
        assert f"(direct coding, {engine} engine, 16 images" in " ".join(done.stderr.split())
        assert json.loads((tmp_path / engine / "summary.json").read_text())["engine"] == engine
    for name in ("accuracy.csv", "counts.json", "layers.csv"):
        assert (tmp_path / "mine" / name).read_bytes() == (tmp_path / "torch" / name).read_bytes()


class TokenResidual(nn.Module):
    """A transformer's pattern: token embeddings computed from the image (one current for every step under direct
    coding) added to per-step values (a residual around spiking layers), and neurons fed windows of the tokens
    folded into the batch dimension (Swin), not the images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Linear(9, 8)
        self.neuron = IFNeuron(torch.tensor(0.3), c_max=None, neg_threshold=1.0)
        self.mix = nn.Linear(8, 8)
        self.window_neuron = IFNeuron(torch.tensor(0.4))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x.view(x.shape[0], 4, 9))           # [batch, 4 tokens, 8]
        tokens = tokens + self.mix(self.neuron(tokens))          # the image's tokens meet per-step values
        windows = self.window_neuron(tokens.reshape(-1, 2, 8))   # [batch x 2 windows, 2 tokens, 8]
        return self.head(windows.reshape(-1, 4, 8).mean(1) + tokens.mean(1))


@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_currents_computed_once_meet_per_step_values_and_windows_fold_into_the_batch(coding):
    data, T = batches(shape=(1, 6, 6)), 9
    reference = simulate_step_by_step(TokenResidual(), data, T, coding=coding, seed=3)
    assert all(events.sum() > 0 for events in reference.events.values())
    for chunk in (2, 4, 9):
        folded = simulate(TokenResidual(), data, T, chunk, coding=coding, seed=3)
        assert torch.equal(folded.correct, reference.correct)
        for name in reference.events:
            assert torch.equal(folded.events[name], reference.events[name])
