"""Per-channel thresholds of token tensors [batch, tokens, features] are per feature (the last dimension, what
nn.Linear and LayerNorm read), not per token; maps [batch, channels, height, width] and rows [batch, features] keep
theirs on dimension 1 (core.stepped.channel_dim, the one definition)."""

import pytest
import torch
from networks import mean_outputs, tiny_vit
from torch import nn

from snnbench.conversion.methods import spiking_copy
from snnbench.core.analog import signed_layers
from snnbench.core.calibrate import balance, calibrate, record_activations
from snnbench.core.graph import canonicalize, spiking_layer_names
from snnbench.core.stepped import broadcast_over_sample, channel_dim
from snnbench.simulation.integer_conv import int8_conv_available
from snnbench.simulation.simulate import simulate


@pytest.mark.parametrize("shape, channel", [((2, 3, 4, 4), 1), ((2, 6), 1), ((2, 5, 16), 2), ((2, 3, 2, 4, 4), 1)])
def test_the_channel_of_maps_and_rows_is_dimension_1_and_of_tokens_the_features(shape, channel):
    assert channel_dim(len(shape)) == channel
    per_channel = torch.arange(1.0, shape[channel] + 1)
    broadcast = broadcast_over_sample(per_channel, len(shape) - 1).expand(shape[1:])
    index = [slice(None)] * (len(shape) - 1)
    index[channel - 1] = 2
    assert torch.equal(broadcast[tuple(index)], torch.full_like(broadcast[tuple(index)], 3.0))


def vit_and_activations(images):
    ann = canonicalize(tiny_vit(), nonlinear="compensate").module
    names, signed = spiking_layer_names(ann), signed_layers(ann)
    activations = record_activations(ann, names, images)
    return ann, {name: act.abs() if name in signed else act for name, act in activations.items()}


def test_per_channel_calibration_of_a_vit_gives_one_threshold_per_feature_of_its_tokens():
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ann, activations = vit_and_activations(images)
    calibration = calibrate(ann, [images], 100, True, "cpu")  # 100: the maximum of each channel
    tokens = [name for name, act in activations.items() if act.dim() == 3]
    assert len(tokens) == 7  # ln_1, ln_2 and the MLP's GELU in each of 2 blocks, and the last LayerNorm
    for name in tokens:
        act = activations[name]  # [batch, 5 tokens, 16 or 32 features]
        expected = act.amax(dim=(0, 1))
        expected = torch.where(expected > 0, expected, expected.max())  # a silent feature: the layer's largest
        torch.testing.assert_close(calibration.thresholds[name], expected, rtol=0, atol=0)
    # the heads of attention [batch, heads, tokens, head dim] are its maps' channels
    for name in set(activations) - set(tokens):
        assert calibration.thresholds[name].shape == (2,)
    balanced = balance(ann, [images], True, "cpu")
    assert all(balanced.thresholds[name].shape == activations[name].shape[-1:] for name in tokens)


@pytest.mark.parametrize("engine", ["torch", pytest.param("int8", marks=pytest.mark.skipif(
    not int8_conv_available(), reason="this PyTorch has no oneDNN int8 convolution"))])
def test_a_vit_with_per_feature_thresholds_counts_what_the_reference_engine_counts(engine):
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ann, _ = vit_and_activations(images)
    thresholds = calibrate(ann, [images], 100, True, "cpu").thresholds
    snn = spiking_copy(ann, thresholds, v0=0.5)
    labels = torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(0))
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    run = simulate(snn, batches, 9, 4, engine=engine)
    reference = simulate(snn, batches, 9, 1, engine="reference")
    assert torch.equal(run.correct, reference.correct)
    for name in reference.events:
        assert torch.equal(run.events[name], reference.events[name]), name
    # and it computes the ANN: its mean output at T = 256 near the logits
    with torch.inference_mode():
        logits = ann(images)
    assert ((mean_outputs(snn, images, 256) - logits).abs().max() / logits.abs().max()).item() < 0.05

def test_per_channel_thresholds_of_a_cnn_stay_on_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    images = torch.rand(5, 1, 8, 8)
    ann = canonicalize(model).module
    calibration = calibrate(ann, [images], 100, True, "cpu")
    activations = record_activations(ann, spiking_layer_names(ann), images)
    for name, act in activations.items():  # [5, 4, 6, 6] and [5, 6]
        expected = act.transpose(0, 1).flatten(1).amax(1)
        torch.testing.assert_close(calibration.thresholds[name], torch.where(expected > 0, expected, expected.max()))
