"""Vision transformers convert (issue 28): torchvision's ViT, hand-written attention and
F.scaled_dot_product_attention with convert.nonlinear=compensate; the products of two spike trains are
SpikeProducts whose work is counted from events; the torch engine counts what the reference engine counts;
method=ecmt; at scale, random vit_b_16 and swin_t approach their ANN as T grows (slow)."""

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import TESTS, snnbench
from networks import HandWrittenAttention, mean_outputs, snn_of, tiny_vit
from torch import nn
from torchvision.ops import StochasticDepth

import snnbench as api
from snnbench.core.analysis import count_macs
from snnbench.core.graph import canonicalize, trainable_trace
from snnbench.core.spike_product import SpikeProduct
from snnbench.errors import UserError
from snnbench.simulation.backend import activation_elements
from snnbench.simulation.integer_conv import int8_conv_available
from snnbench.simulation.memory import step_elements
from snnbench.simulation.simulate import simulate


class FunctionalAttention(HandWrittenAttention):
    """The same block with F.scaled_dot_product_attention."""

    def attend(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)


def products_of(snn) -> dict[str, SpikeProduct]:
    return {name: module for name, module in snn.named_modules() if isinstance(module, SpikeProduct)}


def relative_errors(model, images, steps=(16, 64, 256)) -> dict[int, float]:
    ann, snn = snn_of(model, images, v0=0.5)
    with torch.inference_mode():
        logits = ann(images)
    assert products_of(snn), "the attention products are not products of spike trains"
    return {T: ((mean_outputs(snn, images, T) - logits).abs().max() / logits.abs().max()).item() for T in steps}


@pytest.mark.parametrize("model", [tiny_vit(), HandWrittenAttention(), FunctionalAttention()],
                         ids=["torchvision_vit", "hand_written", "scaled_dot_product_attention"])
def test_attention_converts_and_its_spiking_outputs_approach_the_ann_logits(model):
    torch.manual_seed(1)
    images = torch.rand(8, 1, 8, 8)
    canonical = canonicalize(model, nonlinear="compensate").module
    with torch.inference_mode():
        torch.testing.assert_close(canonical(images), model(images), rtol=1e-5, atol=1e-5)
    errors = relative_errors(model, images)
    assert errors[256] < errors[64] < errors[16]
    assert errors[256] < 0.05


def test_spike_products_are_fed_by_spiking_layers_and_count_their_work():
    images = torch.rand(6, 1, 8, 8)
    ann, snn = snn_of(tiny_vit(), images)
    products = products_of(snn)
    assert len(products) == 4  # Q·Kᵀ and attention·V in each of the two blocks
    # the fan-out of the spiking layers into a product is 0: the product counts its synaptic operations itself
    converted = api.convert(tiny_vit(), "baseline", images, T=4, nonlinear="compensate")
    result = api.simulate(converted, [(images, torch.zeros(6, dtype=torch.long))], chunk=1)
    counts = result.counts
    assert set(counts["products"]) == set(products)
    neuron_sops = sum(layer["events"] * layer["fan_out"] for layer in counts["layers"].values())
    product_sops = sum(work["synaptic_ops"] for work in counts["products"].values())
    assert product_sops > 0
    assert counts["steps"]["sops"][-1] == pytest.approx(neuron_sops + product_sops)
    kinds = dict(zip(result.layers.layer, result.layers.kind, strict=True))
    assert sorted(name for name, kind in kinds.items() if kind == "product of spike trains") == sorted(products)
    # each product rescales its running product once per output value and step: heads x tokens x columns MACs,
    # in each of 2 blocks, for 4 steps
    tokens, heads, head_dim = 5, 2, 8  # 4 patches and the class token
    rescaling = 2 * (heads * tokens * tokens + heads * tokens * head_dim) * 4
    summary = result.summary
    analog = sum(converted.analog.values()) * 4
    assert summary["analog_macs_per_image"] == pytest.approx(analog + rescaling)
    sops = summary["sops_per_image"]
    assert summary["event_driven_share"] == pytest.approx(
        sops / (sops + summary["analog_macs_per_image"] + summary["analog_fed_macs_per_image"]))


def test_the_ann_macs_include_the_attention_products():
    model = tiny_vit()
    ann = canonicalize(model, nonlinear="compensate").module
    macs = count_macs(ann, torch.rand(1, 1, 8, 8))
    tokens, heads, head_dim = 5, 2, 8
    products = {name: value for name, value in macs.items() if "matmul" in name}
    assert len(products) == 4
    assert sum(products.values()) == 2 * 2 * heads * tokens * tokens * head_dim  # Q·Kᵀ and attention·V, 2 blocks


@pytest.mark.parametrize("engine, chunk, coding", [
    ("torch", 1, "direct"), ("torch", 4, "direct"), ("torch", 4, "poisson"),
    pytest.param("int8", 4, "direct", marks=pytest.mark.skipif(not int8_conv_available(),
                                                             reason="this PyTorch has no oneDNN int8 convolution"))])
def test_the_engines_count_what_the_reference_engine_counts_on_a_vit(engine, chunk, coding):
    torch.manual_seed(2)
    images = torch.rand(10, 1, 8, 8)
    _, snn = snn_of(tiny_vit(classes=3), images, v0=0.5)
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    torch_run = simulate(snn, batches, 9, chunk, coding=coding, engine=engine)
    reference = simulate(snn, batches, 9, 1, coding=coding, engine="reference")
    assert torch.equal(torch_run.correct, reference.correct)
    for name in reference.events:
        assert torch.equal(torch_run.events[name], reference.events[name]), name
        assert torch.equal(torch_run.units[name], reference.units[name]), name
    assert reference.products.keys() == torch_run.products.keys() and len(reference.products) == 4
    for name in reference.products:
        assert torch.equal(torch_run.products[name], reference.products[name]), name
    assert 0 < reference.correct.sum() < 9 * 10


def test_the_memory_check_counts_the_attention_state():
    images = torch.rand(2, 1, 8, 8)
    _, snn = snn_of(tiny_vit(), images)
    maps = sum(2 * 5 * 5 + 2 * 5 * 8 for _ in range(2))  # per block the two products' outputs, one image
    assert step_elements(snn, images[0:1]) - activation_elements(snn, images[0:1]) >= 4 * maps


def test_stochastic_depth_trains_like_dropout_and_is_removed_by_conversion():
    model = nn.Sequential(nn.Linear(4, 4), StochasticDepth(0.5, "row"), nn.ReLU(), nn.Linear(4, 2))
    traced = trainable_trace(model)
    x = torch.rand(64, 4)
    traced.train()
    torch.manual_seed(0)
    assert isinstance(traced.get_submodule("1"), StochasticDepth)
    assert (traced.get_submodule("1")(x) == 0).all(1).any()  # whole rows dropped in training
    traced.eval()
    torch.testing.assert_close(traced(x), model.eval()(x))
    result = canonicalize(model)
    assert any("StochasticDepth" in removed for removed in result.removed)


def test_ecmt_refuses_without_compensate_in_one_line(tmp_path):
    out = tmp_path / "run"
    done = snnbench("run", "method=ecmt", "sim.T=2", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: method=ecmt computes the nonlinear operations as analog operators with expectation compensation: "
        "add convert.nonlinear=compensate")
    assert not (out / "summary.json").exists()
    with pytest.raises(UserError, match="convert.nonlinear=compensate"):
        api.convert(tiny_vit(), "ecmt", torch.rand(4, 1, 8, 8), T=4)


def test_ecmt_multi_threshold_neurons_and_the_softmax_threshold():
    images = torch.rand(16, 1, 8, 8)
    converted = api.convert(tiny_vit(), api.methods.ECMT(levels=4), images, T=8, nonlinear="compensate")
    neurons = {name: module for name, module in converted.snn.named_modules() if hasattr(module, "c_max")}
    assert neurons and all(neuron.c_max == 8 for neuron in neurons.values())
    softmax = [name for name in neurons if name.endswith("softmax_spikes")]
    assert len(softmax) == 2
    for name in softmax:
        assert neurons[name].threshold.item() == pytest.approx(0.0125)
    result = api.simulate(converted, [(images, torch.zeros(16, dtype=torch.long))], chunk=1)
    assert 0 < result.summary["event_driven_share"] < 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_torchvision_transformers_at_scale_approach_their_ann(name):
    """Random weights, the smallest input each allows here (vit_b_16 at 32: 4 patches of 16; swin_t at 64),
    the head re-initialised so that the logits differ; calibrated by the maximum on the two images."""
    torch.manual_seed(0)
    if name == "vit_b_16":
        model, images = torchvision.models.vit_b_16(image_size=32, num_classes=10), torch.rand(2, 3, 32, 32)
        head = model.heads.head
    else:
        model, images = torchvision.models.swin_t(num_classes=10), torch.rand(2, 3, 64, 64)
        head = model.head
    nn.init.normal_(head.weight, std=0.1)
    errors = relative_errors(model.eval(), images)
    print(f"{name}: relative error at T = 16, 64, 256: {errors}")  # docs/transformers.md
    assert errors[256] < errors[64] < errors[16]
    assert errors[256] < 0.1 and not math.isnan(errors[16])


def test_a_vit_run_reports_products_and_its_merged_shards_are_the_whole_run(tmp_path):
    run = ("run", "model=custom", "model._target_=networks.digits_vit", "dataset=digits",
           "convert.nonlinear=compensate", "method=ecmt", "sim.T=3", "train.epochs=1", "sim.num_samples=12",
           f"cache_dir={tmp_path / 'cache'}")
    whole = tmp_path / "whole"
    done = snnbench(*run, f"hydra.run.dir={whole}", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    layers = pd.read_csv(whole / "layers.csv")
    products = layers[layers.kind == "product of spike trains"]
    assert len(products) == 4 and (products.sops_per_image > 0).all()
    summary = json.loads((whole / "summary.json").read_text())
    assert 0 < summary["event_driven_share"] < 1
    counts = json.loads((whole / "counts.json").read_text())
    assert len(counts["products"]) == 4
    done = snnbench(run[0], "-m", *run[1:], "sim.shard=0,1", "sim.num_shards=2",
                    f"hydra.sweep.dir={tmp_path / 'sharded'}", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    assert snnbench("report", str(tmp_path / "sharded")).returncode == 0
    merged = tmp_path / "sharded" / "merged" / "0_ecmt"
    assert json.loads((merged / "counts.json").read_text()) == counts
    pd.testing.assert_frame_equal(pd.read_csv(merged / "layers.csv"), layers, check_exact=False, rtol=1e-12, atol=0)
