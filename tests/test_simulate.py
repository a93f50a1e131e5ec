import psutil
import pytest
import torch
from torch import nn

from snnbench.neurons import IFNeuron
from snnbench.simulate import choose_chunk, choose_sub_batch, memory_budget_mb, simulate, simulate_step_by_step


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
    for chunk in (2, 4, 9):
        folded = simulate(spiking_net(**knobs), data, T, chunk, coding=coding, seed=3)
        assert torch.equal(folded.correct, reference.correct)
        for name in reference.events:
            torch.testing.assert_close(folded.events[name], reference.events[name])
            torch.testing.assert_close(folded.units[name], reference.units[name])


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
    result = simulate(net, data, 8, chunk=2, coding=coding, seed=3)
    assert net[0].calls == len(data) * (1 if coding == "direct" else 4)  # 4 chunks per batch
    assert "forward" not in net[0].__dict__  # its own forward back after the run
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
