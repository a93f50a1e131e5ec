"""TTRBR (Meng et al. 2022, docs/methods.md): residual block restructuring, then thresholds tuned for a target T.

Tuning goes layer by layer from the input, in one T-step simulation of the calibration images with all T steps
folded into one forward: a hook on each spiking layer receives the input current over the T steps from the
layers below (already tuned, earlier in the same forward), runs the layer's IF neuron with every candidate
threshold (scale x percentile threshold) on it, and keeps the candidate with the smallest mean squared error
between the T-step rate and the ANN activation, for the whole layer or per channel, before the layer runs. So the
deviation error caused by the real, time-varying input is part of what is measured, and the whole tuning costs
one simulation of the calibration images plus the candidates' neuron updates.

With `correct_mean` (an addition to docs/methods.md's rule, after Li et al. 2021's bias correction) the hook
then gives the layer a bias current per channel that cancels the mean of the remaining rate error, so the layers
above see rates without the systematic part of the error below them.

Per layer the diagnostics (layers.csv) give the RMS over calibration neurons of the error against the ANN, and
of its parts for the mean current I over the T steps: quantization Q(I) - clip(I, 0, threshold), with Q the rate
of a constant input, and deviation r - Q(I), with r the actual rate.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from snnbench.conversion.corrections import (
    cancel_mean_error,
    channel_sums,
    correct_layer_by_layer,
    rate_of,
    rebuilt_neurons,
)
from snnbench.conversion.methods import (
    Method,
    check_choice,
    check_flag,
    check_number,
    check_positive_int,
    converted,
    spiking_copy,
)
from snnbench.conversion.restructure import KINDS, Restructuring, SplitReLU
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import device_of
from snnbench.core.neurons import NeuronSpec
from snnbench.core.stepped import broadcast_over_sample
from snnbench.errors import UserError

ERRORS = ("error_rms", "quantization_rms", "deviation_rms")


@dataclass(frozen=True)
class TTRBR(Method):
    name: str = "ttrbr"
    v0: float = 0.5                    # initial membrane potential, in units of the threshold (0.5: rounding)
    neg_threshold: float | None = None  # None: binary IF; x: TerMapping's negative spike at V <= -x theta
    restructure: str = "split"         # none | shortcut_neuron | merged | split
    copies: int = 2                    # split: neurons per post-addition channel
    tune: bool = True                  # False: keep the percentile thresholds
    T: int | None = None               # the T the thresholds are tuned for (None: the run's T)
    scales: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3)  # candidates, x the percentile one
    correct_mean: bool = True          # also cancel each channel's mean rate error with a bias current
    per_channel: bool = True           # percentile and tuned scale per channel (False: per layer)
    tune_images: int = 32              # calibration images the tuning simulates

    def validate(self):
        check_number("v0", self.v0, example=0.5)
        check_number("neg_threshold", self.neg_threshold, positive=True, allow_none=True, example=0.1)
        check_choice("restructure", self.restructure, KINDS)
        check_positive_int("copies", self.copies, example=2)
        check_positive_int("T", self.T, allow_none=True, example=32)
        check_positive_int("tune_images", self.tune_images, example=32)
        for key, value in (("tune", self.tune), ("correct_mean", self.correct_mean),
                           ("per_channel", self.per_channel)):
            check_flag(key, value)
        scales = self.scales
        numbers = isinstance(scales, Sequence) and not isinstance(scales, str) and all(
            not isinstance(s, bool) and isinstance(s, int | float) and s > 0 for s in scales)
        if not numbers or len(scales) == 0:
            raise UserError(f"method.scales must be a non-empty list of positive numbers (candidate thresholds, x "
                            f"the percentile threshold), got {scales!r}: e.g. method.scales=[0.5,0.75,1.0]")
        object.__setattr__(self, "scales", tuple(scales))  # a list from a config: the field's type, hashable

    def convert(self, ann, calibration, batches, context):
        restructuring = Restructuring(self.restructure, self.copies, tuple(batches[0][:2].shape))
        model = restructuring.apply(ann)
        if self.restructure != "none" or self.per_channel != calibration.per_channel:
            # new neurons, or percentiles per channel: calibrate the rewritten network the same way
            calibration = calibrate(model, batches, context.percentile, self.per_channel, device_of(model),
                                    context.seed)
        snn = spiking_copy(model, calibration.thresholds, v0=self.v0, neg_threshold=self.neg_threshold)
        staggered = {}  # the neurons of each split's copies start at its phases
        for name, split in snn.named_modules():
            if isinstance(split, SplitReLU):
                spec = split.relu.spec
                staggered[f"{name}.relu"] = replace(spec, v0=split.phases(self.v0).to(spec.threshold.device))
        snn = rebuilt_neurons(snn, staggered)
        images = torch.cat(batches)[:self.tune_images].to(device_of(model))  # the tuning runs where the model is
        scales = list(self.scales) if self.tune else [1.0]
        snn, diagnostics = tune(snn, model, images, scales, self.T or context.T, self.per_channel,
                                self.correct_mean)
        return converted(model, calibration, snn, diagnostics, restructuring)  # the report counts on the rewrite


def tune(snn, ann, images, scales, T, per_channel, correct_mean=False) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of `snn` with every spiking layer tuned in one T-step simulation of `images`, and the per-layer
    diagnostics."""
    def tune_layer(spec, currents, target):
        spec, diagnostics = choose_threshold(spec, currents, target, scales, per_channel)
        if correct_mean:
            spec, diagnostics["mean_error"] = cancel_mean_error(spec, currents, target)
        return spec, diagnostics
    return correct_layer_by_layer(snn, ann, images, T, tune_layer)


def choose_threshold(spec, currents, target, scales, per_channel) -> tuple[NeuronSpec, dict]:
    """`spec` with the candidate threshold of the least squared error on `currents` [T, batch, ...] against the
    ANN activation `target`, and the chosen threshold's diagnostics."""
    base = spec.threshold
    errors = torch.stack([_squared_errors(replace(spec, threshold=base * s), currents, target) for s in scales])
    errors /= target.numel() / errors.shape[2]  # [candidate, error kind, channel]: mean per neuron
    channels = torch.arange(errors.shape[2], device=errors.device)
    best = errors[:, 0].argmin(0) if per_channel else errors[:, 0].mean(1).argmin().expand(len(channels))
    chosen = errors[best, :, channels]  # [channel, error kind]
    scale = torch.tensor(scales, device=errors.device)[best]
    diagnostics = {"percentile_threshold": base.mean().item(), "threshold_scale": scale.mean().item(),
                   **{kind: chosen[:, k].mean().sqrt().item() for k, kind in enumerate(ERRORS)}}
    return replace(spec, threshold=base * (scale if per_channel else scale[0])), diagnostics


def _squared_errors(spec, currents, target) -> torch.Tensor:
    """Per channel, summed over images and positions: squared error against the ANN, quantization, deviation."""
    T = len(currents)
    rate = rate_of(spec, currents, T)
    mean_current = currents.mean(0)
    constant_rate = rate_of(spec, mean_current, T, constant=True)
    theta = broadcast_over_sample(spec.threshold, target.dim() - 1)
    clipped = torch.minimum(mean_current.clamp(min=0), theta)
    return torch.stack([channel_sums((rate - target) ** 2), channel_sums((constant_rate - clipped) ** 2),
                        channel_sums((rate - constant_rate) ** 2)])
