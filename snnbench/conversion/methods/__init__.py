"""One small module per conversion method. Each exposes

    a Method subclass named <name>           the knobs, typed, with their defaults (those of conf/method/<name>.yaml)
    validate(knobs)                          -> None, or a UserError naming the knob and the fix
    convert(ann, calibration, cfg, batches)  -> Conversion

where `ann` is the canonical network (snnbench.core.graph.canonicalize: BatchNorm folded, one ReLU module per call
site), `calibration` holds its percentile thresholds, `cfg` is the whole run config (the method's knobs under
cfg.method) and `batches` yields calibration images (training split). A new method is one module here plus one
YAML in conf/method/.
"""

import importlib
import math
import pkgutil
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from torch import nn

from snnbench.conversion.restructure import Restructuring
from snnbench.core.calibrate import Calibration
from snnbench.errors import UserError


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


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str):
    if name not in available():
        raise UserError(f"unknown method '{name}': choose one of {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")


@dataclass(frozen=True)
class Method:
    """A method's knobs as a typed object (what snnbench.convert takes): a subclass per method, whose fields are
    the knobs of conf/method/<name>.yaml with the same defaults, checked on construction by the method's
    validate."""
    name: ClassVar[str] = ""  # the method's module in this package

    def __post_init__(self):
        get(self.name).validate(asdict(self))


def method_class(name: str) -> type[Method]:
    """The Method subclass of method `name`: the one its module defines (or imports) under that name."""
    module = get(name)
    found = [value for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, Method) and value.name == name]
    if not found:
        raise UserError(f"method '{name}' has no typed knobs: its module {module.__name__} defines no Method "
                        f"subclass with name = '{name}'")
    return found[0]


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


# methods whose rules are defined on analog operators (expectation compensation): they need them
NEEDS_ANALOG_OPERATORS = {"ecmt"}


def check_nonlinear(method: str, nonlinear: str):
    """Refuse a method that needs analog operators when the nonlinear operations are not computed as such."""
    if method in NEEDS_ANALOG_OPERATORS and nonlinear != "compensate":
        raise UserError(f"method={method} computes the nonlinear operations as analog operators with expectation "
                        "compensation: add convert.nonlinear=compensate")


# ---- knob checks shared by the methods' validate functions ----

def check_number(knobs, key: str, *, positive=False, allow_none=False, example=None):
    value = knobs.get(key)
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or (positive and value <= 0)):
        kind = "a positive finite number" if positive else "a finite number"
        raise UserError(f"method.{key} must be {kind}{' or null' if allow_none else ''}, got {value!r}"
                        + (f": set e.g. method.{key}={example}" if example is not None else ""))


def check_positive_int(knobs, key: str, *, allow_none=False, example=2):
    value = knobs.get(key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"method.{key} must be a positive integer{' or null' if allow_none else ''}, got "
                        f"{value!r}: set e.g. method.{key}={example}")


def check_flag(knobs, key: str):
    if not isinstance(knobs.get(key), bool):
        raise UserError(f"method.{key} must be true or false, got {knobs.get(key)!r}")


def check_choice(knobs, key: str, allowed):
    if knobs.get(key) not in allowed:
        raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got {knobs.get(key)!r}")
