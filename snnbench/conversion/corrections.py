"""Neurons rebuilt from changed specs, and the corrections measured layer by layer on the spiking network itself,
shared by the methods that make them (TTRBR's threshold tuning and mean correction, Li et al. 2021's bias and
potential corrections). A correction never changes a neuron: it computes a new spec (core.neurons.NeuronSpec),
and the corrected network has a neuron built from it.

`correct_layer_by_layer` runs one T-step simulation of calibration images with all T steps folded into one
forward: a hook on each spiking layer receives the input current over the T steps from the layers below (already
corrected, earlier in the same forward), computes the layer's corrected spec, and passes on what a neuron built
from it emits, so the error a layer inherits from the spiking layers below is part of what it corrects. The whole
pass costs one simulation of the images plus the corrections' own neuron runs and one more run of each layer's
corrected neuron.
"""

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from snnbench.core.calibrate import record_activations
from snnbench.core.graph import replace_modules, spiking_layer_names
from snnbench.core.neurons import IFNeuron, NeuronSpec
from snnbench.core.stepped import broadcast_over_sample, channel_dim, channel_major
from snnbench.simulation.simulate import simulate

# a layer's correction: its neuron's spec, the currents [T, batch, ...] it receives and the ANN's activation ->
# the corrected spec and the layer's diagnostics (layers.csv columns)
Correction = Callable[[NeuronSpec, torch.Tensor, torch.Tensor], tuple[NeuronSpec, dict]]


def rebuilt_neurons(network: nn.Module, specs: dict[str, NeuronSpec]) -> nn.Module:
    """A copy of `network` whose neuron `name` is built anew from `specs[name]`, of the class it had; `network`
    is not changed."""
    return replace_modules(network, {name: type(network.get_submodule(name)).built(spec)
                                     for name, spec in specs.items()})


@torch.inference_mode()
def correct_layer_by_layer(snn: nn.Module, ann: nn.Module, images: torch.Tensor, T: int,
                           correct: Correction) -> tuple[nn.Module, dict[str, dict]]:
    """Correct every spiking layer of `snn`, from the input up, in one T-step simulation of `images`: `correct`
    gets the layer's spec, what the layer receives from the corrected layers below and its ANN activation, and
    a neuron built from the spec it returns fires in the layer's place for the layers above. Returns a copy of
    `snn` with every neuron rebuilt from its corrected spec (`snn` is not changed), and the diagnostics each call
    returned, per layer."""
    names = spiking_layer_names(ann)
    targets = record_activations(ann, names, images)
    specs, diagnostics, hooks = {}, {}, []
    for name in names:
        def correct_and_fire(neuron, args, output, name=name):
            x, constant = args[0], 0 in neuron.constant_inputs  # direct coding: the image's layer, one current
            currents = x.expand(T, *x.shape) if constant else x.view(T, len(images), *x.shape[1:])
            specs[name], diagnostics[name] = correct(neuron.spec, currents, targets[name])
            return fire(type(neuron).built(specs[name]), x, T, constant)
        hooks.append(snn.get_submodule(name).register_forward_hook(correct_and_fire))
    try:
        simulate(snn, [(images, torch.zeros(len(images), dtype=torch.long))], T, chunk=T, device=images.device)
    finally:
        for hook in hooks:
            hook.remove()
    return rebuilt_neurons(snn, specs), diagnostics


def cancel_mean_error(spec: NeuronSpec, currents, target, rounds=3) -> tuple[NeuronSpec, float]:
    """`spec` with the bias current (per channel) added that cancels the mean error of its rate against the ANN
    on `currents` [T, batch, ...]. Only neurons between silence and saturation follow a shift of their current,
    so the shift is measured and repeated `rounds` times. Also returns the mean absolute error per channel
    before."""
    T = len(currents)
    channels = target.shape[channel_dim(target.dim())]
    bias = currents.new_zeros(channels) if spec.bias is None else spec.bias.expand(channels)
    errors = []
    for _ in range(rounds):
        error = rate_of(replace(spec, bias=bias), currents, T) - target
        errors.append(channel_sums(error) / (target.numel() / channels))
        bias = bias - errors[-1]
    return replace(spec, bias=bias), errors[0].abs().mean().item()


def correct_initial_potential(spec: NeuronSpec, currents, target) -> tuple[NeuronSpec, float]:
    """`spec` with each neuron's initial membrane potential shifted by T x its mean error (rate x threshold
    against the ANN, averaged over the images) on `currents` [T, batch, ...]: what the neuron lacks over T steps
    it holds from the start. Also returns the mean absolute error per neuron before."""
    T = len(currents)
    error = (rate_of(spec, currents, T) - target).mean(0)
    v0 = broadcast_over_sample(spec.v0, error.dim()) - T * error / broadcast_over_sample(spec.threshold, error.dim())
    return replace(spec, v0=v0), error.abs().mean().item()


def rate_of(spec: NeuronSpec, currents: torch.Tensor, T: int, constant: bool = False) -> torch.Tensor:
    """T-step rate (x threshold) of a neuron of `spec` fed `currents` [T, batch, ...], or, `constant`, one
    current [batch, ...] at every step."""
    batch = len(currents) if constant else currents.shape[1]
    output = fire(IFNeuron.built(spec), currents if constant else currents.flatten(0, 1), T, constant)
    return output.view(T, batch, *output.shape[1:]).mean(0)


def fire(neuron: IFNeuron, currents: torch.Tensor, T: int, constant: bool) -> torch.Tensor:
    """What `neuron` emits over T steps from a fresh start, all in one chunk: `currents` [T x batch, ...], or,
    `constant`, one current [batch, ...] for every step."""
    neuron.begin(T)
    neuron.next_chunk(T)
    neuron.declare_constant_inputs([0] if constant else [])
    return neuron(currents)


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    return channel_major(x).sum(1)
