"""Activation statistics of every spiking layer (the ReLU modules of a canonical network) via forward hooks, on
training-split calibration images: each layer's threshold is a percentile of its activations, or grown by local
threshold balancing."""

from dataclasses import dataclass

import torch
from torch import nn

from snnbench.core.analog import signed_layers
from snnbench.core.graph import ClippedReLU, device_of, spiking_layer_names
from snnbench.core.stepped import broadcast_over_sample, channel_dim, channel_major
from snnbench.errors import UserError

SAMPLES_PER_BATCH = 100_000  # activations kept per layer and batch for the percentile (quantile's size limit)
RULES = ("percentile", "local_balancing")
BALANCING_EPS = 1e-6  # the smallest balanced threshold (SpikingJelly's eps)


@dataclass
class Calibration:
    thresholds: dict[str, torch.Tensor]   # per layer: a scalar, or one value per channel (channel_dim)
    neurons: dict[str, int]               # neurons per image in each layer
    percentile: float | None              # None: thresholds not chosen by a percentile
    per_channel: bool
    rule: str = "percentile"              # how the thresholds were found (RULES)


def record_activations(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named modules for one batch of images."""
    outputs, hooks = {}, []
    for name in names:
        def keep(module, inputs, output, name=name):
            outputs[name] = output
        hooks.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """Percentile over the last dimension, ignoring NaNs (non-positive activations)."""
    return torch.nanquantile(values, percentile / 100.0, dim=-1)


@torch.inference_mode()
def calibrate(model: nn.Module, batches, percentile: float, per_channel: bool, device, seed=0,
              rule="percentile") -> Calibration:
    """Threshold of each ReLU layer = `percentile` of its positive activations (100 = the exact maximum),
    per layer or per channel; percentiles below 100 use a seeded sample of the activations. With
    `rule=local_balancing`, the thresholds of `balance` instead."""
    if rule not in RULES:
        raise UserError(f"calibrate.rule must be one of {', '.join(RULES)}, got {rule!r}")
    model = model.eval().to(device)
    if rule == "local_balancing":
        return balance(model, batches, per_channel, device)
    names, signed = spiking_layer_names(model), signed_layers(model)
    generator = torch.Generator().manual_seed(seed)
    samples = {name: [] for name in names}
    maxima, neurons = {}, {}
    for images in batches:
        for name, act in record_activations(model, names, images.to(device)).items():
            act = act.float().cpu()
            if name in signed:  # a signed neuron spikes at +-threshold: its threshold sizes the magnitude
                act = act.abs()
            neurons[name] = act[0].numel()
            rows = channel_major(act) if per_channel else act.reshape(1, -1)
            batch_max = rows.amax(dim=1)
            maxima[name] = torch.maximum(maxima[name], batch_max) if name in maxima else batch_max
            if percentile < 100:
                channels, columns = rows.shape
                keep = torch.randperm(columns, generator=generator)[:max(SAMPLES_PER_BATCH // channels, 1000)]
                picked = rows[:, keep]
                samples[name].append(torch.where(picked > 0, picked, torch.nan))
    thresholds = {}
    for name in names:
        value = maxima[name] if percentile >= 100 else _percentile(torch.cat(samples[name], dim=1), percentile)
        # a channel that never fired (NaN / 0) keeps the layer's largest threshold: it will not spike anyway
        fallback = torch.nan_to_num(value, nan=0.0).max().clamp(min=1e-3)
        value = torch.where(torch.isnan(value) | (value <= 0), fallback, value)
        thresholds[name] = value if per_channel else value.reshape(())
    return Calibration(thresholds, neurons, percentile, per_channel)


@torch.inference_mode()
def balance(model: nn.Module, batches, per_channel: bool, device) -> Calibration:
    """Local threshold balancing (SpikingJelly's LocalThresholdBalancingRecipe, after Bu et al., CVPR 2025):
    every threshold starts at 0, each calibration batch grows it by 2 x the mean of relu(activation - threshold)
    (per channel, or over the whole layer), and the layers above see the activations clipped at the grown
    threshold, so each layer is balanced on what the clipped layers below give it."""
    model = model.eval().to(device)
    names, signed = spiking_layer_names(model), signed_layers(model)
    thresholds, neurons, hooks = {}, {}, []
    for name in names:
        def grow_and_clip(module, inputs, output, name=name):
            sign = output.sign() if name in signed else None  # a signed layer: balanced on the magnitude
            output = output.abs() if name in signed else output
            channel = channel_dim(output.dim())
            reduced = [d for d in range(output.dim()) if d != channel] if per_channel else list(range(output.dim()))
            threshold = thresholds.get(name, output.new_zeros(output.shape[channel] if per_channel else ()))
            overflow = torch.relu(output - broadcast_over_sample(threshold, output.dim() - 1)).mean(reduced)
            # a clipped ReLU's threshold never exceeds its clip (where its activation saturates)
            clip = module.clip if isinstance(module, ClippedReLU) else None
            thresholds[name] = (threshold + 2 * overflow).clamp(min=BALANCING_EPS, max=clip)
            neurons[name] = output[0].numel()
            clipped = torch.minimum(output, broadcast_over_sample(thresholds[name], output.dim() - 1))
            return clipped if sign is None else clipped * sign
        hooks.append(model.get_submodule(name).register_forward_hook(grow_and_clip))
    try:
        for images in batches:
            model(images.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration({name: value.cpu() for name, value in thresholds.items()}, neurons, None, per_channel,
                       "local_balancing")


@torch.inference_mode()
def neuron_maxima(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Each spiking layer's largest activation of every neuron (shaped like one sample) on the calibration
    images; a neuron that never fired gets its layer's largest, a threshold it will not reach anyway."""
    names, signed = spiking_layer_names(model), signed_layers(model)
    maxima = {}
    for images in batches:
        for name, activation in record_activations(model, names, images.to(device_of(model))).items():
            top = (activation.abs() if name in signed else activation).amax(0)
            maxima[name] = torch.maximum(maxima[name], top) if name in maxima else top
    return {name: torch.where(top > 0, top, top.max().clamp(min=1e-3)) for name, top in maxima.items()}
