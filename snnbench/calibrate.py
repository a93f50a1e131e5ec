"""Activation statistics of every spiking layer (the ReLU modules of a canonical network) via forward hooks, on
training-split calibration images."""

from dataclasses import dataclass

import torch
from torch import nn

from snnbench.convert import spiking_layer_names

SAMPLES_PER_BATCH = 100_000  # activations kept per layer and batch for the percentile (quantile's size limit)


@dataclass
class Calibration:
    thresholds: dict[str, torch.Tensor]   # per layer: a scalar, or one value per channel
    neurons: dict[str, int]               # neurons per image in each layer
    percentile: float
    per_channel: bool


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
def calibrate(model: nn.Module, batches, percentile: float, per_channel: bool, device, seed=0) -> Calibration:
    """Threshold of each ReLU layer = `percentile` of its positive activations (100 = the exact maximum),
    per layer or per channel; percentiles below 100 use a seeded sample of the activations."""
    model = model.eval().to(device)
    names = spiking_layer_names(model)
    generator = torch.Generator().manual_seed(seed)
    samples = {name: [] for name in names}
    maxima, neurons = {}, {}
    for images in batches:
        for name, act in record_activations(model, names, images.to(device)).items():
            act = act.float().cpu()
            neurons[name] = act[0].numel()
            channel_major = act.transpose(0, 1).reshape(act.shape[1], -1) if per_channel else act.reshape(1, -1)
            batch_max = channel_major.amax(dim=1)
            maxima[name] = torch.maximum(maxima[name], batch_max) if name in maxima else batch_max
            if percentile < 100:
                rows, columns = channel_major.shape
                keep = torch.randperm(columns, generator=generator)[:max(SAMPLES_PER_BATCH // rows, 1000)]
                picked = channel_major[:, keep]
                samples[name].append(torch.where(picked > 0, picked, torch.nan))
    thresholds = {}
    for name in names:
        value = maxima[name] if percentile >= 100 else _percentile(torch.cat(samples[name], dim=1), percentile)
        # a channel that never fired (NaN / 0) keeps the layer's largest threshold: it will not spike anyway
        fallback = torch.nan_to_num(value, nan=0.0).max().clamp(min=1e-3)
        value = torch.where(torch.isnan(value) | (value <= 0), fallback, value)
        thresholds[name] = value if per_channel else value.reshape(())
    return Calibration(thresholds, neurons, percentile, per_channel)
