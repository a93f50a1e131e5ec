"""convert.nonlinear=compensate: analog operators with expectation compensation (their output summed up to t is
t * f(mean input up to t)), the signed spiking layers that re-encode their outputs before weight layers, the
engines that simulate them (the reference engine as the oracle), and their accounting in layers.csv, summary.json
and the report."""

import json
import operator

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import TESTS, snnbench
from networks import mean_outputs, randomised, snn_of
from torch import nn
from user_models import MobileStyle, WithGelu

from snnbench.core.analog import Analog, AnalogOperator, Slot
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import canonicalize
from snnbench.errors import UserError
from snnbench.simulation.simulate import simulate

SHAPE = (4, 3, 3)  # one sample: channels x height x width
OPERATORS = {
    "SiLU": (nn.SiLU(), 1), "Hardswish": (nn.Hardswish(), 1), "GELU": (nn.GELU(), 1), "Sigmoid": (nn.Sigmoid(), 1),
    "Tanh": (nn.Tanh(), 1), "Hardsigmoid": (nn.Hardsigmoid(), 1), "LayerNorm": (nn.LayerNorm(SHAPE), 1),
    "GroupNorm": (nn.GroupNorm(2, 4), 1), "Softmax": (nn.Softmax(dim=1), 1), "F.gelu": (F.gelu, 1),
    "Tensor.sigmoid": ("sigmoid", 1), "product": (operator.mul, 2),
}


def analog(name: str) -> Analog:
    function, arity = OPERATORS[name]
    if isinstance(function, nn.LayerNorm | nn.GroupNorm):  # not the identity's weights
        torch.manual_seed(1)
        function.weight.data.uniform_(0.5, 1.5)
        function.bias.data.uniform_(-0.5, 0.5)
    return Analog(function, tuple(Slot(i) for i in range(arity)), {}, (True,) * arity, product=arity == 2)


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("constant", [False, True])
def test_an_analog_operator_sums_to_t_times_f_of_the_mean_input_in_chunks_of_any_length(name, constant):
    T, batch, chunks = 9, 2, (3, 1, 5)
    function = analog(name)
    torch.manual_seed(0)
    inputs = [torch.randn(T, batch, *SHAPE) * 2 for _ in function.running]
    if constant:  # an input current constant over the chunk (direct coding), given once per chunk
        inputs = [x[:1].expand(T, *x.shape[1:]) for x in inputs]
    operator_ = AnalogOperator(function)
    operator_.declare_constant_inputs(range(len(inputs)) if constant else ())
    operator_.begin(T)
    emitted, start = [], 0
    for steps in chunks:
        operator_.next_chunk(steps)
        chunk = [x[start] if constant else x[start:start + steps].flatten(0, 1) for x in inputs]
        emitted.append(operator_(*chunk).view(steps, batch, *SHAPE))
        start += steps
    summed = torch.cat(emitted).cumsum(0)
    t = torch.arange(1, T + 1).view(-1, 1, 1, 1, 1)
    means = [x.cumsum(0) / t for x in inputs]
    expected = t * function(*[m.flatten(0, 1) for m in means]).view(T, batch, *SHAPE)
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-5)
    if not constant:  # the mean, not the last input
        assert not torch.allclose(expected[-1] / T, function(*[x[-1] for x in inputs]))


def test_refuse_names_compensate_and_compensate_converts_the_same_function():
    model = WithGelu().eval()
    with pytest.raises(UserError, match=r"cannot convert act \(nn.GELU\) at user_models.py:\d+: .*add "
                                        r"convert.nonlinear=compensate"):
        canonicalize(model)
    canonical = canonicalize(model, nonlinear="compensate")
    assert list(canonical.analog) == ["act"] and list(canonical.layers) == ["act_spikes"]  # it feeds fc (pooled)
    image = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(canonical.module(image), model(image))


class WithExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.exp(x.flatten(1)[:, :4]))


@pytest.mark.parametrize("nonlinear", ["refuse", "compensate"])
def test_an_operation_compensate_cannot_compute_is_refused_without_pointing_at_it(nonlinear):
    with pytest.raises(UserError, match=r"cannot convert node exp \(torch.exp\) at test_analog.py:\d+: .*nor an "
                                        r"operation that convert.nonlinear=compensate computes") as refused:
        canonicalize(WithExp(), nonlinear=nonlinear)
    assert "add convert.nonlinear=compensate" not in str(refused.value)


class EveryForm(nn.Module):
    """Each analog operation in its function or method form, LayerNorm with its own parameters (get_attr nodes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.weight, self.bias = nn.Parameter(torch.rand(4, 8, 8) + 0.5), nn.Parameter(torch.rand(4, 8, 8) - 0.5)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = F.layer_norm(self.conv(x), (4, 8, 8), self.weight, self.bias)
        x = F.group_norm(F.hardswish(x), 2) + torch.tanh(x) + F.hardsigmoid(x) + F.gelu(x, approximate="tanh")
        x = x.softmax(dim=1) * F.silu(x) + x.sigmoid() * torch.sigmoid(x)
        return self.fc(torch.flatten(x, 1))


def test_every_function_and_method_form_converts_and_computes_the_model():
    torch.manual_seed(0)
    model = EveryForm().eval()
    canonical = canonicalize(model, nonlinear="compensate")
    assert [origin.split(" (")[1].split(")")[0] for origin in canonical.analog.values()] == [
        "F.layer_norm", "F.hardswish", "F.group_norm", "torch.tanh", "F.hardsigmoid", "torch._C._nn.gelu",
        "Tensor.softmax", "F.silu", "_operator.mul", "Tensor.sigmoid", "torch.sigmoid", "_operator.mul"]
    image = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(canonical.module(image), model(image))
    ann, snn = snn_of(model, image, v0=0.5)
    errors = [(mean_outputs(snn, image, T) - ann(image)).abs().max().item() for T in (16, 256)]
    assert errors[1] < errors[0] / 4


class NegativeTanh(nn.Module):
    """A tanh whose outputs are all negative (near -1), feeding a linear layer: a signed layer with no positive
    value to calibrate on."""

    def __init__(self):
        super().__init__()
        self.hidden, self.fc = nn.Linear(64, 8), nn.Linear(8, 10)
        nn.init.constant_(self.hidden.bias, -3.0)
        nn.init.zeros_(self.hidden.weight)

    def forward(self, x):
        return self.fc(torch.tanh(self.hidden(x.flatten(1))))


@pytest.mark.parametrize("rule", ["percentile", "local_balancing"])
def test_a_signed_layer_is_calibrated_on_the_magnitude_of_its_values(rule):
    ann = canonicalize(NegativeTanh(), nonlinear="compensate").module
    images = torch.rand(20, 1, 8, 8)
    threshold = calibrate(ann, [images[:10], images[10:]], 100, False, "cpu", rule=rule).thresholds["tanh_spikes"]
    magnitude = -torch.tanh(torch.tensor(-3.0)).item()  # every value of the layer is tanh(-3)
    # the maximum; local balancing grows 0 by twice the mean overflow on the first batch, none on the second
    expected = magnitude if rule == "percentile" else 2 * magnitude
    assert threshold.item() == pytest.approx(expected, rel=1e-5)


def mobile_style():
    torch.manual_seed(0)
    return randomised(MobileStyle(width=8))


def test_weight_layers_are_fed_spikes_and_only_the_nonlinear_functions_are_analog():
    model = mobile_style()
    canonical = canonicalize(model, nonlinear="compensate")
    modules = dict(canonical.module.named_modules())
    assert set(canonical.analog) == {"stem.2", "expand.2", "silu", "se.act", "se.sigmoid", "se.mul", "head.2"}
    assert all(isinstance(modules[name], Analog) for name in canonical.analog)
    # each analog output feeds weights or a product; so does the sum of the residual and the projection (a conv)
    assert set(canonical.layers) == {f"{name}_spikes" for name in [*canonical.analog, "add"]}
    fed_by = {}
    for node in canonical.module.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d | nn.Linear | Analog):
            sources, frontier = set(), list(node.all_input_nodes)
            while frontier:  # back through linear maps to what drives this layer
                source = frontier.pop()
                module = modules.get(source.target) if source.op == "call_module" else None
                if source.op == "placeholder" or isinstance(module, nn.ReLU | Analog | nn.Conv2d | nn.Linear):
                    sources.add("image" if source.op == "placeholder" else type(module).__name__)
                else:
                    frontier.extend(source.all_input_nodes)
            fed_by[node.target] = sources
    weights = {name for name in fed_by if isinstance(modules[name], nn.Conv2d | nn.Linear)}
    assert fed_by.pop("stem.0") == {"image"}
    assert all(fed_by[name] == {"Reencode"} for name in weights - {"stem.0"})
    assert fed_by["se.mul"] == {"Reencode"}
    image = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(canonical.module(image), model(image), rtol=1e-5, atol=1e-6)


def test_the_spiking_outputs_approach_the_ann_logits_as_t_grows():
    model = mobile_style()
    images = torch.rand(16, 1, 8, 8)
    ann, snn = snn_of(model, images, v0=0.5)
    with torch.inference_mode():
        logits = ann(images)
    errors = {T: (mean_outputs(snn, images, T) - logits).abs().max().item() for T in (16, 64, 256)}
    assert errors[256] < errors[64] < errors[16]
    assert errors[256] < 0.05 * logits.abs().max().item()
    agreement = (mean_outputs(snn, images, 256).argmax(1) == logits.argmax(1)).float().mean().item()
    assert agreement >= 0.9


@pytest.mark.parametrize("engine", ["torch", "int8"])
@pytest.mark.parametrize("coding", ["direct", "poisson"])
def test_the_engines_count_what_the_reference_engine_counts_at_every_t(engine, coding):
    model = mobile_style()
    images = torch.rand(12, 1, 8, 8)
    _, snn = snn_of(model, images)
    labels = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(0))
    batches = [(images[:7], labels[:7]), (images[7:], labels[7:])]
    torch_run = simulate(snn, batches, 11, 4, coding=coding, engine=engine)
    reference = simulate(snn, batches, 11, 4, coding=coding, engine="reference")
    assert torch.equal(torch_run.correct, reference.correct)
    assert torch_run.events.keys() == reference.events.keys() and len(torch_run.events) == 8
    for name in reference.events:
        assert torch.equal(torch_run.events[name], reference.events[name]), name
        assert torch.equal(torch_run.units[name], reference.units[name]), name
    assert 0 < reference.correct.sum() < 11 * 12  # the counts are not trivially all right or all wrong


def test_a_run_with_compensate_reports_kinds_and_the_event_driven_share(tmp_path):
    out = tmp_path / "run"
    done = snnbench("run", "model=custom", "model._target_=user_models.MobileStyle", "convert.nonlinear=compensate",
                    "sim.T=4", "train.epochs=1", "sim.num_samples=20", f"hydra.run.dir={out}",
                    f"cache_dir={tmp_path / 'cache'}", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns[:7]) == ["layer", "neurons", "threshold", "events_per_image", "spike_units_per_image",
                                        "firing_rate", "sops_per_image"]
    assert layers.columns[-1] == "kind"
    kinds = dict(zip(layers.layer, layers.kind, strict=True))
    assert kinds["se.mul"] == "analog" and kinds["se.mul_spikes"] == "spiking (re-encodes analog)"
    assert sorted(set(kinds.values())) == ["analog", "spiking (re-encodes analog)"]
    assert layers[layers.kind == "analog"].events_per_image.isna().all()
    summary = json.loads((out / "summary.json").read_text())
    analog_values = layers[layers.kind == "analog"].neurons.sum()
    assert summary["analog_macs_per_image"] == analog_values * 4  # one MAC per value and step
    sops = summary["sops_per_image"]
    assert summary["event_driven_share"] == pytest.approx(
        sops / (sops + summary["analog_macs_per_image"] + summary["analog_fed_macs_per_image"]))
    assert 0 < summary["event_driven_share"] < 1
    report = snnbench("report", str(out))
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(out / "report.csv")
    assert (table.event_driven_share == summary["event_driven_share"]).all()


def test_inspect_refuses_a_bad_nonlinear_choice_and_shows_the_analog_operators():
    done = snnbench("inspect", "model=custom", "model._target_=user_models.MobileStyle", "convert.nonlinear=analog",
                    cwd=TESTS, in_process=True)
    assert done.returncode == 2
    assert "convert.nonlinear must be one of refuse, compensate" in done.stdout + done.stderr
    inspected = snnbench("inspect", "model=custom", "model._target_=user_models.MobileStyle",
                         "convert.nonlinear=compensate", cwd=TESTS, in_process=True)
    assert inspected.returncode == 0, inspected.stderr
    assert "8 spiking layers, 7 analog operators" in inspected.stdout
