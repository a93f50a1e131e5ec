"""The conversion methods as typed objects, for snnbench.convert: `snnbench.methods.AugMapping(c_max=2)`. Each is
a frozen dataclass whose fields are its knobs with their defaults; a bad value raises snnbench.errors.UserError
when the object is made. The classes live beside each method's conversion, in snnbench.conversion.methods.

A method by name (`named("burst")`) is its conf/method/<name>.yaml read without Hydra: the YAML it builds on (its
`defaults`) merged under its own keys, its `_target_` class made with the knobs there. A knob whose value only a
run gives (`T: ${sim.T}`, `trained_with: ${train.activation}`) keeps the class's default: snnbench.convert passes
T itself, and the API cannot know how an ANN was trained."""

from omegaconf import OmegaConf

from snnbench.conversion.methods import Method, build_method
from snnbench.conversion.methods.augmapping import AugMapping
from snnbench.conversion.methods.baseline import Baseline
from snnbench.conversion.methods.calibration import Calibration
from snnbench.conversion.methods.ecmt import ECMT
from snnbench.conversion.methods.qcfs import QCFS
from snnbench.conversion.methods.spikezip import SpikeZIP
from snnbench.conversion.methods.termapping import TerMapping
from snnbench.conversion.methods.ttrbr import TTRBR
from snnbench.errors import UserError
from snnbench.io.configs import CONF_DIR

__all__ = ["ECMT", "QCFS", "TTRBR", "AugMapping", "Baseline", "Calibration", "Method", "SpikeZIP", "TerMapping",
           "available", "build_method", "method_config", "named"]

METHODS_DIR = CONF_DIR / "method"


def available() -> list[str]:
    """The methods by name: conf/method's YAML files, presets included."""
    return sorted(path.stem for path in METHODS_DIR.glob("*.yaml"))


def method_config(name: str) -> dict:
    """conf/method/<name>.yaml as a plain dict, merged over the YAML its `defaults` name (as Hydra composes it:
    `_self_` last unless placed), without the knobs whose value is an interpolation of the run's config."""
    if name not in available():
        raise UserError(f"unknown method '{name}': choose one of {', '.join(available())}")
    config = OmegaConf.load(METHODS_DIR / f"{name}.yaml")
    defaults = list(config.pop("defaults", []))
    merged = OmegaConf.create({})
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:
        merged = OmegaConf.merge(merged, config if entry == "_self_" else method_config(entry))
    return {key: value for key, value in OmegaConf.to_container(merged, resolve=False).items()
            if not OmegaConf.is_interpolation(merged, key)}


def named(name: str, **knobs) -> Method:
    """The method conf/method/<name>.yaml describes, with `knobs` set over its values."""
    return build_method({**method_config(name), **knobs})
