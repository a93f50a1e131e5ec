"""A conversion as data, for the cache: what rebuilds it from snnbench's own code, never a pickled module.

The saved form holds the spiking network's state_dict, each neuron's class (one of NEURONS) and settings, how
the canonical ANN was rewritten before its ReLUs became neurons (Restructuring), the class of every module (to
check the rebuilt network against), and the calibration, fan-out and diagnostics as tensors and plain values.
`rebuilt` makes the network again from the canonical ANN and loads the state strictly; anything that does not
fit (an unknown class, a missing or extra key, a wrong shape or type, another module) is a ValueError, KeyError
or RuntimeError, and the cache builds the entry again."""

import torch
from torch import nn

from snnbench.conversion.methods import Conversion
from snnbench.conversion.methods.spikezip import SpikeTracerNeuron
from snnbench.conversion.restructure import Restructuring
from snnbench.core.analog import ReencodingNeuron, analog_operators
from snnbench.core.calibrate import Calibration
from snnbench.core.graph import device_of, replace_modules, spiking_layer_names
from snnbench.core.neurons import IFNeuron, NeuronSpec

# the classes a saved conversion may name
NEURONS = {"IFNeuron": IFNeuron, "ReencodingNeuron": ReencodingNeuron, "SpikeTracerNeuron": SpikeTracerNeuron}


def as_data(conversion: Conversion) -> dict:
    snn, restructuring = conversion.snn, conversion.restructuring
    neurons = {}
    for name, module in snn.named_modules():
        if isinstance(module, IFNeuron):
            if NEURONS.get(type(module).__name__) is not type(module):
                raise TypeError(f"cannot save neuron {name} of class {type(module).__name__}: not in NEURONS")
            neurons[name] = {"class": type(module).__name__, "c_max": module.c_max,
                             "neg_threshold": module.neg_threshold,
                             "require_positive_net": module.require_positive_net,
                             "emits_coefficients": module.emits_coefficients}
    return {"restructuring": {"kind": restructuring.kind, "copies": restructuring.copies,
                              "example_shape": list(restructuring.example_shape)},
            "neurons": neurons, "state": _compact(snn.state_dict()),
            "modules": {name: type(module).__name__ for name, module in snn.named_modules()},
            "calibration": calibration_as_data(conversion.calibration), "fan_out": dict(conversion.fan_out),
            "diagnostics": conversion.diagnostics}


def rebuilt(data: dict, ann: nn.Module) -> Conversion:
    """The conversion `data` (as_data) describes, made from the canonical ANN `ann`, on its device."""
    restructuring = Restructuring(_string(data["restructuring"]["kind"]), _count(data["restructuring"]["copies"]),
                                  tuple(_count(n) for n in data["restructuring"]["example_shape"]))
    network = restructuring.apply(ann)
    state = data["state"]
    snn = replace_modules(network, {name: _neuron(name, settings, state)
                                    for name, settings in data["neurons"].items()})
    snn = replace_modules(snn, analog_operators(snn))  # convert.nonlinear=compensate
    snn.to(device_of(ann)).load_state_dict(state, strict=True)
    modules = {name: type(module).__name__ for name, module in snn.named_modules()}
    recorded = data["modules"]
    # a network this code makes otherwise than the one saved is never simulated in its place
    different = sorted(name for name in {*modules, *recorded} if modules.get(name) != recorded.get(name))
    if different:
        raise ValueError(f"module {different[0]!r} is a {modules.get(different[0])} rebuilt, a "
                         f"{recorded.get(different[0])} saved")
    names = spiking_layer_names(network)
    if sorted(names) != sorted(data["neurons"]):
        raise ValueError(f"the neurons saved ({len(data['neurons'])}) are not the network's spiking layers "
                         f"({len(names)})")
    fan_out = {name: _number(value) for name, value in data["fan_out"].items()}
    diagnostics = {_string(name): {_string(column): _cell(value) for column, value in values.items()}
                   for name, values in data["diagnostics"].items()}
    if not set(fan_out) | set(diagnostics) <= set(modules):
        raise ValueError("the fan-out or diagnostics saved name layers the network does not have")
    return Conversion(snn, calibration_from(data["calibration"], names), fan_out, diagnostics, restructuring)


def calibration_as_data(calibration: Calibration) -> dict:
    return {"thresholds": _compact(calibration.thresholds),
            "neurons": dict(calibration.neurons), "percentile": calibration.percentile,
            "per_channel": calibration.per_channel, "rule": calibration.rule}


def calibration_from(data: dict, layers: list[str]) -> Calibration:
    """The Calibration `data` (calibration_as_data) describes, checked against the network's spiking `layers`."""
    thresholds, neurons = data["thresholds"], data["neurons"]
    if sorted(thresholds) != sorted(layers) or sorted(neurons) != sorted(layers):
        raise ValueError("the calibration saved names other layers than the network's spiking layers")
    if not all(isinstance(value, torch.Tensor) for value in thresholds.values()):
        raise ValueError("a calibrated threshold is not a tensor")
    percentile = data["percentile"]
    return Calibration({name: thresholds[name] for name in layers}, {name: _count(neurons[name]) for name in layers},
                       None if percentile is None else _number(percentile), _flag(data["per_channel"]),
                       _string(data["rule"]))


def _compact(tensors: dict) -> dict:
    """The tensors on the CPU, each in a storage of its own (torch.save writes the whole storage of a view)."""
    return {name: value.detach().cpu().clone() for name, value in tensors.items()}


def _neuron(name: str, settings: dict, state: dict) -> IFNeuron:
    """The neuron `name` as saved: its class from NEURONS, its settings checked, its buffers from `state`."""
    if settings["class"] not in NEURONS:
        raise ValueError(f"neuron {name} names class {settings['class']!r}, which is not one of snnbench's")
    c_max, neg_threshold = settings["c_max"], settings["neg_threshold"]
    return NEURONS[settings["class"]].built(NeuronSpec(
        state[f"{name}.threshold"], state[f"{name}.v0"], None if c_max is None else _count(c_max),
        None if neg_threshold is None else _number(neg_threshold), _flag(settings["require_positive_net"]),
        _flag(settings["emits_coefficients"]), state.get(f"{name}.bias")))


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    return value


def _cell(value):
    """A layers.csv cell: a number, a string or empty."""
    if value is not None and not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a table cell")
    return value


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _string(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value
