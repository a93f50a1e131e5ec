"""One small module per conversion method, each a frozen dataclass subclass of `Method`:

    its fields                                   the knobs, typed, with their defaults (conf/method/<name>.yaml
                                                 instantiates the class by `_target_` and may set other values)
    validate(self)                               called on construction: a UserError naming a bad knob and the fix
    convert(self, ann, calibration, batches, context) -> Conversion

where `ann` is the canonical network (snnbench.core.graph.canonicalize: BatchNorm folded, one ReLU module per call
site), `calibration` holds its percentile thresholds, `batches` are calibration images (training split) and
`context` is what a method may read of the run besides its knobs (Context: T, the calibration's percentile and
seed). A new method is one module here plus one YAML in conf/method/; a preset of an existing method under a name
of its own (burst, snm, calibration_advanced) is one YAML alone.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from snnbench.conversion.restructure import Restructuring
from snnbench.core.calibrate import Calibration
from snnbench.errors import UserError
from snnbench.io.configs import class_named


@dataclass
class Conversion:
    """What a method returns: the spiking network, and the calibration and fan-out of the network it was built
    from (a rewrite of the ANN for methods that restructure it), with per-layer diagnostics for layers.csv."""
    snn: nn.Module
    calibration: Calibration
    fan_out: dict[str, float]                                   # synapses per neuron of each spiking layer
    diagnostics: dict[str, dict] = field(default_factory=dict)  # per spiking layer: extra layers.csv columns
    # how the network that `snn` spikes for was rewritten from the canonical ANN (TTRBR): what rebuilds it from a
    # saved conversion (snnbench.conversion.saved)
    restructuring: Restructuring = field(default_factory=Restructuring)


@dataclass(frozen=True)
class Context:
    """What a method may read of the run besides its knobs: nothing else of the run's config reaches it."""
    T: int              # the time steps simulated (sim.T): what a method tunes for unless its own knob T says
    percentile: float   # the calibration's percentile (calibrate.percentile), for a method that calibrates again
    seed: int           # the seed of the calibration's sampling (seed)


@dataclass(frozen=True)
class Method:
    """A conversion method with its knobs: a subclass per method, whose fields are the knobs with their defaults,
    checked on construction. `name` names the results (run folders, reports, accuracy.csv's `method` column): a
    preset is the same class under a name of its own."""
    name: str
    # the method's rule is defined on analog operators (expectation compensation): the run must compute the
    # nonlinear operations as such (convert.nonlinear=compensate)
    needs_analog_operators: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise UserError(f"method.name must be a name of letters, digits, _ . or - (it names run folders and "
                            f"results), got {self.name!r}")
        self.validate()

    def validate(self):
        """Raise a UserError naming the first bad knob and the fix."""

    def convert(self, ann: nn.Module, calibration: Calibration, batches: list[torch.Tensor],
                context: Context) -> Conversion:
        raise NotImplementedError(f"{type(self).__name__} defines no convert")


def build_method(config: Mapping) -> Method:
    """The method a config mapping describes (a conf/method YAML as a plain dict): `_target_`, the dotted path of
    a Method subclass, and its knobs, `name` among them. The one way a method is made from a config, by the
    command line and by the Python API alike."""
    knobs = dict(config)
    method_class = method_class_of(knobs.pop("_target_", None))
    check_knobs(method_class, knobs, knobs.get("name", method_class.__name__))
    return method_class(**knobs)


def method_class_of(target) -> type[Method]:
    """The Method subclass a `_target_` names."""
    return class_named(target, "method", Method, "snnbench.conversion.methods.augmapping.AugMapping")


def check_knobs(method_class: type[Method], knobs: Mapping, name: str):
    """Refuse a knob that `method_class` does not have, listing those it has."""
    known = [knob.name for knob in fields(method_class)]
    unknown = [str(key) for key in knobs if key not in known]
    if unknown:
        raise UserError(f"method {name} has no knob {', '.join(unknown)}: its knobs are {', '.join(known)}")


def spiking_copy(ann, thresholds: dict, scale: float = 1.0, **neuron_knobs) -> nn.Module:
    """A copy of `ann` with each ReLU replaced by an IF neuron of threshold scale x thresholds[name] (a signed one
    where the layer re-encodes an analog operator; for a clipped ReLU at most the clip, capped_at_clip) and each
    analog operator by its stateful form."""
    from snnbench.core.analog import Reencode, analog_operators
    from snnbench.core.graph import ClippedReLU, device_of, replace_modules
    from snnbench.core.neurons import IFNeuron, capped_at_clip

    def neuron(name, threshold):
        layer = ann.get_submodule(name)
        if isinstance(layer, ClippedReLU):  # its rate must saturate where the activation does, at the clip
            threshold, c_max = capped_at_clip(threshold * scale, neuron_knobs.get("c_max", 1), layer.clip)
            return IFNeuron(threshold, **{**neuron_knobs, "c_max": c_max})
        return (layer.neuron if isinstance(layer, Reencode) else IFNeuron)(threshold * scale, **neuron_knobs)

    snn = replace_modules(ann, {name: neuron(name, threshold) for name, threshold in thresholds.items()})
    snn = replace_modules(snn, analog_operators(snn))
    return snn.to(device_of(ann))  # the new neurons' buffers join the ANN's device


def converted(ann, calibration: Calibration, snn: nn.Module, diagnostics: dict | None = None,
              restructuring: Restructuring = Restructuring()) -> Conversion:
    """The Conversion of `snn`, built from `ann` (the canonical ANN rewritten by `restructuring`) calibrated as
    `calibration`."""
    from snnbench.core.analysis import fan_out

    return Conversion(snn, calibration, fan_out(ann), diagnostics or {}, restructuring)


def check_nonlinear(method: Method, nonlinear: str):
    """Refuse a method that needs analog operators when the nonlinear operations are not computed as such."""
    if method.needs_analog_operators and nonlinear != "compensate":
        raise UserError(f"method={method.name} computes the nonlinear operations as analog operators with "
                        "expectation compensation: add convert.nonlinear=compensate")


# ---- knob checks shared by the methods' validate ----

def check_number(key: str, value, *, positive=False, allow_none=False, example=None):
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or (positive and value <= 0)):
        kind = "a positive finite number" if positive else "a finite number"
        raise UserError(f"method.{key} must be {kind}{' or null' if allow_none else ''}, got {value!r}"
                        + (f": set e.g. method.{key}={example}" if example is not None else ""))


def check_positive_int(key: str, value, *, allow_none=False, example=2):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"method.{key} must be a positive integer{' or null' if allow_none else ''}, got "
                        f"{value!r}: set e.g. method.{key}={example}")


def check_flag(key: str, value):
    if not isinstance(value, bool):
        raise UserError(f"method.{key} must be true or false, got {value!r}")


def check_choice(key: str, value, allowed):
    if value not in allowed:
        raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got {value!r}")
