"""TTRBR (Meng et al. 2022, METHODS.md): residual block restructuring, then thresholds tuned for a target T.

Tuning goes layer by layer from the input, in one T-step simulation of the calibration images with all T steps
folded into one forward: a hook on each spiking layer receives the input current over the T steps from the
layers below (already tuned, earlier in the same forward), runs the layer's IF neuron with every candidate
threshold (scale x percentile threshold) on it, and keeps the candidate with the smallest mean squared error
between the T-step rate and the ANN activation, for the whole layer or per channel, before the layer runs. So the
deviation error caused by the real, time-varying input is part of what is measured, and the whole tuning costs
one simulation of the calibration images plus the candidates' neuron updates.

With `correct_mean` (an addition to METHODS.md's rule, after Li et al. 2021's bias correction) the hook then gives
the layer a bias current per channel that cancels the mean of the remaining rate error, so the layers above
see rates without the systematic part of the error below them.

Per layer the diagnostics (layers.csv) give the RMS over calibration neurons of the error against the ANN, and
of its parts for the mean current I over the T steps: quantization Q(I) - clip(I, 0, threshold), with Q the rate
of a constant input, and deviation r - Q(I), with r the actual rate.
"""

from collections.abc import Sequence

import torch

from snnbench.calibrate import calibrate, record_activations
from snnbench.convert import device_of, spiking_layer_names
from snnbench.errors import UserError
from snnbench.methods import check_choice, check_flag, check_number, check_positive_int, converted, spiking_copy
from snnbench.neurons import IFNeuron
from snnbench.restructure import KINDS, SplitReLU, restructure
from snnbench.simulate import simulate

ERRORS = ("error_rms", "quantization_rms", "deviation_rms")


def validate(knobs):
    check_number(knobs, "v0", example=0.5)
    check_number(knobs, "neg_threshold", positive=True, allow_none=True, example=0.1)
    check_choice(knobs, "restructure", KINDS)
    check_positive_int(knobs, "copies", example=2)
    check_positive_int(knobs, "T", allow_none=True, example=32)
    check_positive_int(knobs, "tune_images", example=32)
    for key in ("tune", "correct_mean", "per_channel"):
        check_flag(knobs, key)
    scales = knobs.get("scales")
    numbers = isinstance(scales, Sequence) and not isinstance(scales, str) and all(
        not isinstance(s, bool) and isinstance(s, int | float) and s > 0 for s in scales)
    if not numbers or len(scales) == 0:
        raise UserError(f"method.scales must be a non-empty list of positive numbers (candidate thresholds, x the "
                        f"percentile threshold), got {scales!r}: e.g. method.scales=[0.5,0.75,1.0]")


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    model = restructure(ann, knobs.restructure, knobs.copies, batches[0][:2])
    if knobs.restructure != "none" or knobs.per_channel != calibration.per_channel:
        # new neurons, or percentiles per channel: calibrate the rewritten network the same way
        calibration = calibrate(model, batches, cfg.calibrate.percentile, knobs.per_channel, device_of(model),
                                cfg.seed)
    snn = spiking_copy(model, calibration.thresholds, v0=knobs.v0, neg_threshold=knobs.neg_threshold)
    for split in (module for module in snn.modules() if isinstance(module, SplitReLU)):
        split.relu.v0 = split.phases(knobs.v0).to(split.relu.threshold.device)
    images = torch.cat(batches)[:knobs.tune_images].to(device_of(model))  # the tuning runs where the model is
    scales = list(knobs.scales) if knobs.tune else [1.0]
    diagnostics = tune(snn, model, images, scales, knobs.T or cfg.sim.T, knobs.per_channel, knobs.correct_mean)
    return converted(model, calibration, snn, diagnostics)  # the report counts on the rewritten ANN


@torch.inference_mode()
def tune(snn, ann, images, scales, T, per_channel, correct_mean=False) -> dict[str, dict]:
    """Tune every spiking layer of `snn` in one T-step simulation of `images`; return per-layer diagnostics."""
    names = spiking_layer_names(ann)
    targets = record_activations(ann, names, images)
    diagnostics, hooks = {}, []
    for name in names:
        def tune_before_firing(neuron, args, name=name):
            currents = args[0]
            if currents.shape[0] == len(images):  # direct coding: a layer fed by the image gets a constant current
                currents = currents.expand(T, *currents.shape)
            else:
                currents = currents.view(T, len(images), *currents.shape[1:])
            diagnostics[name] = choose_threshold(neuron, currents, targets[name], scales, per_channel)
            if correct_mean:
                diagnostics[name]["mean_error"] = cancel_mean_error(neuron, currents, targets[name])
        hooks.append(snn.get_submodule(name).register_forward_pre_hook(tune_before_firing))
    try:
        simulate(snn, [(images, torch.zeros(len(images), dtype=torch.long))], T, chunk=T, device=images.device)
    finally:
        for hook in hooks:
            hook.remove()
    return diagnostics


def choose_threshold(neuron, currents, target, scales, per_channel) -> dict:
    """Set `neuron`'s threshold to the candidate with the least squared error on `currents` [T, batch, ...]
    against the ANN activation `target`; return the chosen threshold's diagnostics."""
    base = neuron.threshold
    errors = torch.stack([_squared_errors(neuron, currents, target, base * s) for s in scales])
    errors /= target.numel() / target.shape[1]  # [candidate, error kind, channel]: mean per neuron
    channels = torch.arange(errors.shape[2], device=errors.device)
    best = errors[:, 0].argmin(0) if per_channel else errors[:, 0].mean(1).argmin().expand(len(channels))
    chosen = errors[best, :, channels]  # [channel, error kind]
    scale = torch.tensor(scales, device=errors.device)[best]
    neuron.threshold = base * (scale if per_channel else scale[0])
    return {"percentile_threshold": base.mean().item(), "threshold_scale": scale.mean().item(),
            **{kind: chosen[:, k].mean().sqrt().item() for k, kind in enumerate(ERRORS)}}


def cancel_mean_error(neuron, currents, target, rounds=3) -> float:
    """Give `neuron` a bias current per channel that cancels the mean error of its rate against the ANN on
    `currents`. Only neurons between silence and saturation follow a shift of their current, so the shift is
    measured and repeated `rounds` times. Returns the mean absolute error per channel before the correction."""
    T, batch = currents.shape[:2]
    bias, errors = currents.new_zeros(currents.shape[2]), []
    for _ in range(rounds):
        error = _rate(neuron, neuron.threshold, currents.flatten(0, 1), T, batch, bias) - target
        errors.append(_channel_sums(error) / (target.numel() / target.shape[1]))
        bias -= errors[-1]
    neuron.bias = bias
    return errors[0].abs().mean().item()


def _rate(like, threshold, currents, T, batch, bias=None) -> torch.Tensor:
    """T-step rate of a neuron of the same kind as `like` with `threshold` (and a bias current per channel, if
    given): `currents` is [T * batch, ...] or a constant [batch, ...]."""
    neuron = IFNeuron(threshold, v0=like.v0, c_max=like.c_max, neg_threshold=like.neg_threshold,
                      require_positive_net=like.require_positive_net)
    neuron.bias = bias
    neuron.reset(batch, T)
    neuron.steps = T
    output = neuron(currents)
    return output.view(T, batch, *output.shape[1:]).mean(0)


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1).sum(1)


def _squared_errors(neuron, currents, target, threshold) -> torch.Tensor:
    """Per channel, summed over images and positions: squared error against the ANN, quantization, deviation."""
    T, batch = currents.shape[:2]
    rate = _rate(neuron, threshold, currents.flatten(0, 1), T, batch)
    mean_current = currents.mean(0)
    constant_rate = _rate(neuron, threshold, mean_current, T, batch)
    theta = threshold.view(-1, *[1] * (target.dim() - 2)) if threshold.dim() else threshold
    clipped = torch.minimum(mean_current.clamp(min=0), theta)
    return torch.stack([_channel_sums((rate - target) ** 2), _channel_sums((constant_rate - clipped) ** 2),
                        _channel_sums((rate - constant_rate) ** 2)])
