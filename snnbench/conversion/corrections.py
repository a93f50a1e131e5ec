"""Corrections measured layer by layer on the spiking network itself, shared by the methods that make them
(TTRBR's threshold tuning and mean correction, Li et al. 2021's bias and potential corrections).

`correct_layer_by_layer` runs one T-step simulation of calibration images with all T steps folded into one
forward: a hook on each spiking layer receives the input current over the T steps from the layers below (already
corrected, earlier in the same forward) and adjusts the layer's neuron before it fires, so the error a layer
inherits from the spiking layers below is part of what it corrects. The whole pass costs one simulation of the
images plus the corrections' own neuron runs.
"""

from collections.abc import Callable

import torch

from snnbench.core.calibrate import record_activations
from snnbench.core.graph import spiking_layer_names
from snnbench.core.neurons import IFNeuron
from snnbench.core.stepped import broadcast_over_sample
from snnbench.simulation.simulate import simulate


@torch.inference_mode()
def correct_layer_by_layer(snn, ann, images, T, correct: Callable) -> dict[str, dict]:
    """Call `correct(neuron, currents, target)` on every spiking layer of `snn`, from the input up, in one T-step
    simulation of `images`: `currents` [T, batch, ...] is what the layer receives from the corrected layers below,
    `target` the ANN's activation of that layer. Returns the dict each call returned, per layer."""
    names = spiking_layer_names(ann)
    targets = record_activations(ann, names, images)
    diagnostics, hooks = {}, []
    for name in names:
        def correct_before_firing(neuron, args, name=name):
            currents = args[0]
            if currents.shape[0] == len(images):  # direct coding: a layer fed by the image gets a constant current
                currents = currents.expand(T, *currents.shape)
            else:
                currents = currents.view(T, len(images), *currents.shape[1:])
            diagnostics[name] = correct(neuron, currents, targets[name])
        hooks.append(snn.get_submodule(name).register_forward_pre_hook(correct_before_firing))
    try:
        simulate(snn, [(images, torch.zeros(len(images), dtype=torch.long))], T, chunk=T, device=images.device)
    finally:
        for hook in hooks:
            hook.remove()
    return diagnostics


def cancel_mean_error(neuron, currents, target, rounds=3) -> float:
    """Add to `neuron`'s bias current (per channel) what cancels the mean error of its rate against the ANN on
    `currents` [T, batch, ...]. Only neurons between silence and saturation follow a shift of their current, so
    the shift is measured and repeated `rounds` times. Returns the mean absolute error per channel before."""
    T, batch = currents.shape[:2]
    channels = currents.shape[2]
    bias = currents.new_zeros(channels) if neuron.bias is None else neuron.bias.expand(channels).clone()
    errors = []
    for _ in range(rounds):
        error = rate_of(neuron, neuron.threshold, currents.flatten(0, 1), T, batch, bias) - target
        errors.append(channel_sums(error) / (target.numel() / target.shape[1]))
        bias -= errors[-1]
    neuron.bias = bias
    return errors[0].abs().mean().item()


def correct_initial_potential(neuron, currents, target) -> float:
    """Shift each neuron's initial membrane potential by T x its mean error (rate x threshold against the ANN,
    averaged over the images) on `currents` [T, batch, ...]: what the neuron lacks over T steps it holds from
    the start. Returns the mean absolute error per neuron before."""
    T, batch = currents.shape[:2]
    error = (rate_of(neuron, neuron.threshold, currents.flatten(0, 1), T, batch, neuron.bias) - target).mean(0)
    neuron.v0 = (broadcast_over_sample(neuron.v0, error.dim())
                 - T * error / broadcast_over_sample(neuron.threshold, error.dim()))
    return error.abs().mean().item()


def rate_of(like, threshold, currents, T, batch, bias=None) -> torch.Tensor:
    """T-step rate (x threshold) of a neuron of the same kind as `like` with `threshold` (and a bias current per
    channel, if given): `currents` is [T * batch, ...] or a constant [batch, ...]."""
    neuron = IFNeuron(threshold, v0=like.v0, c_max=like.c_max, neg_threshold=like.neg_threshold,
                      require_positive_net=like.require_positive_net)
    neuron.bias = bias
    neuron.begin(T)
    neuron.next_chunk(T)
    neuron.declare_constant_inputs([0] if len(currents) == batch else [])
    output = neuron(currents)
    return output.view(T, batch, *output.shape[1:]).mean(0)


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1).sum(1)
