"""SNN calibration (Li et al., ICML 2021, "A free lunch from ANN: towards efficient, accurate spiking neural
networks calibration"), as their public code does it (yhhhli/SNN_Calibration, main_cal_cifar.py and
models/spiking_layer.py, models/calibration.py at commit 4aece7c), for binary IF neurons reset by subtraction:

1. thresholds: per layer (or per channel) the candidate max x (1 - 0.01 i), i = 0 .. 94, with the least mean
   squared error between the ANN activation x of a calibration batch and its T-level clipped floor
   floor(clamp(x T / theta, 0, T)) theta / T; averaged over the calibration batches with momentum 0.9
   (`thresholds=max`: the batches' maxima, averaged the same way: their `--calib none`);
2. shift: an input current theta / (2T) every step, which turns the floor into rounding;
3. bias correction (their *light* calibration): layer by layer from the input, each channel's mean of
   rate x theta - ANN activation, measured on one batch fed through the already corrected spiking layers
   below, taken off the layer's bias (one measurement);
4. potential correction (their *advanced* calibration on CIFAR, which skips 3 there): each neuron's initial
   membrane potential += T x its mean remaining error on that batch.
Their weight calibration (ImageNet, Adam on each layer's weights for thousands of steps) is not implemented.
"""

from dataclasses import dataclass, replace

import torch

from snnbench.conversion.corrections import (
    cancel_mean_error,
    correct_initial_potential,
    correct_layer_by_layer,
    rebuilt_neurons,
)
from snnbench.conversion.methods import Method, check_choice, check_flag, check_positive_int, converted, spiking_copy
from snnbench.core.calibrate import record_activations
from snnbench.core.graph import device_of, spiking_layer_names
from snnbench.core.neurons import NeuronSpec
from snnbench.core.stepped import broadcast_over_sample, channel_major
from snnbench.errors import UserError

CANDIDATES = 95     # thresholds max x (1 - 0.01 i) searched (find_threshold_mse)


@dataclass(frozen=True)
class Calibration(Method):
    name: str = "calibration"
    T: int | None = None               # the T the thresholds and corrections are for (None: the run's T)
    thresholds: str = "mse"            # mse | max
    momentum: float = 0.9              # the thresholds averaged over the calibration batches
    per_channel: bool = False
    shift: bool = True                 # an input current theta / (2T) every step
    bias_correction: bool = True       # each channel's mean rate error taken off its bias, layer by layer
    potential_correction: bool = False  # each neuron's initial potential += T x its mean error
    correction_images: int = 128       # calibration images the corrections measure on

    def validate(self):
        check_choice("thresholds", self.thresholds, ("mse", "max"))
        check_positive_int("T", self.T, allow_none=True, example=32)
        momentum = self.momentum
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
            raise UserError(f"method.momentum must be a number in [0, 1) (how much of the threshold found so far "
                            f"each calibration batch keeps), got {momentum!r}: e.g. method.momentum=0.9")
        for key, value in (("per_channel", self.per_channel), ("shift", self.shift),
                           ("bias_correction", self.bias_correction),
                           ("potential_correction", self.potential_correction)):
            check_flag(key, value)
        check_positive_int("correction_images", self.correction_images, example=128)

    def convert(self, ann, calibration, batches, context):
        T = self.T or context.T
        thresholds = searched_thresholds(ann, batches, T, self.thresholds, self.momentum, self.per_channel)
        snn = spiking_copy(ann, thresholds, v0=0.0)
        if self.shift:
            specs = {name: snn.get_submodule(name).spec for name in thresholds}
            snn = rebuilt_neurons(snn, {name: replace(spec, bias=spec.threshold / (2 * T))
                                        for name, spec in specs.items()})
        diagnostics = {}
        if self.bias_correction or self.potential_correction:
            images = torch.cat(batches)[:self.correction_images].to(device_of(ann))
            snn, diagnostics = correct_layer_by_layer(snn, ann, images, T, lambda spec, currents, target: correct(
                spec, currents, target, self.bias_correction, self.potential_correction))
        return converted(ann, calibration, snn, diagnostics)


def correct(spec, currents, target, bias_correction, potential_correction) -> tuple[NeuronSpec, dict]:
    diagnostics = {}
    if bias_correction:  # emp_bias_corr: one measurement of the mean error, off the bias
        spec, diagnostics["mean_error"] = cancel_mean_error(spec, currents, target, rounds=1)
    if potential_correction:
        spec, diagnostics["potential_error"] = correct_initial_potential(spec, currents, target)
    return spec, diagnostics


@torch.inference_mode()
def searched_thresholds(ann, batches, T, rule, momentum, per_channel) -> dict[str, torch.Tensor]:
    """Each spiking layer's threshold: per calibration batch the MSE-best candidate (`rule=mse`) or the maximum
    (`max`) of its ANN activations, per layer or per channel, averaged over the batches with `momentum`
    (get_maximum_activation's DataSaverHook)."""
    names = spiking_layer_names(ann)
    thresholds = {}
    for images in batches:
        for name, activation in record_activations(ann, names, images.to(device_of(ann))).items():
            found = best_threshold(activation, T, per_channel) if rule == "mse" else _maximum(activation, per_channel)
            thresholds[name] = found if name not in thresholds else momentum * thresholds[name] + (1 - momentum) * found
    # a layer (or channel) that never fired keeps a tiny positive threshold: it will not spike anyway
    return {name: value.clamp(min=1e-6) for name, value in thresholds.items()}


def best_threshold(activation: torch.Tensor, T: int, per_channel: bool) -> torch.Tensor:
    """find_threshold_mse: the candidate max x (1 - 0.01 i), i = 0 .. 94, with the least squared error between
    the activation and its T-level clipped floor; per layer (a scalar) or per channel."""
    top = _maximum(activation, per_channel)
    best, least = top.clone(), torch.full_like(top, float("inf"))
    for i in range(CANDIDATES):
        theta = top * (1.0 - 0.01 * i)
        error = _mean_square(activation - clip_floor(activation, T, theta), per_channel)
        better = error < least
        best, least = torch.where(better, theta, best), torch.where(better, error, least)
    return best


def clip_floor(x: torch.Tensor, T: int, theta: torch.Tensor) -> torch.Tensor:
    """What T steps of an IF neuron of threshold theta can say about a constant input x: floor(clamp(x T /
    theta, 0, T)) theta / T (theta a scalar or one per channel)."""
    theta = broadcast_over_sample(theta, x.dim() - 1)
    return torch.floor(torch.clamp(x * T / theta, 0, T)) * theta / T


def _maximum(activation: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return channel_major(activation).amax(1) if per_channel else activation.max()


def _mean_square(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return channel_major(x ** 2).mean(1) if per_channel else (x ** 2).mean()

