import psutil
import pytest
import torch
from torch import nn

from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.simulation import engines
from snnbench.simulation.backend import Settings
from snnbench.simulation.integer_conv import int8_conv_available
from snnbench.simulation.simulate import choose_chunk, choose_engine, choose_sub_batch, memory_budget_mb, simulate


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
        simulation = engines.get("torch").prepare(spiking_net(), Settings(T, 4, coding, seed=3, sub_batch=2,
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


def test_the_engine_is_chosen_for_the_device_and_refused_with_the_fix(monkeypatch):
    assert choose_engine("auto", False, "cpu") == ("torch", None)
    assert choose_engine("reference", "auto", "cpu") == ("reference", None)
    assert choose_engine("auto", "auto", "cuda") == ("triton", None)  # Triton ships with the CUDA build of torch
    if int8_conv_available():
        assert choose_engine("auto", True, "cpu") == ("int8", 0)
        assert choose_engine("int8", "auto", "cpu") == ("int8", 256)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for args, message in [
        (("fast", "auto", "cpu"), "sim.engine must be auto or one of int8, reference, torch, triton, got 'fast'"),
        (("triton", "auto", "cpu"), r"sim.engine=triton runs on CUDA devices \(device here: cpu\): set device=cuda, "
                                    "or TRITON_INTERPRET=1"),
        (("int8", "auto", "cuda"), "sim.engine=int8 needs device=cpu"),
        (("int8", False, "cpu"), "sim.integer_conv=false turns off: set sim.integer_conv=auto or true"),
        (("auto", True, "cuda"), "sim.integer_conv=true asks for the int8 engine, which needs device=cpu"),
        (("torch", True, "cpu"), r"here: sim.engine=torch on cpu"),
    ]:
        with pytest.raises(UserError, match=message):
            choose_engine(*args)


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
