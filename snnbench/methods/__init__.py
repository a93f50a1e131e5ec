"""One small module per conversion method. Each exposes

    convert(ann, calibration, cfg, batches) -> spiking model

where `ann` has its BatchNorms folded, `calibration` holds the percentile thresholds, `cfg` is the whole run
config (the method's knobs under cfg.method) and `batches` yields calibration images (training split).
A new method is one module here plus one YAML in conf/method/.
"""

import importlib
import pkgutil

from snnbench.errors import UserError


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str):
    if name not in available():
        raise UserError(f"unknown method '{name}': choose one of {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")


def spiking_copy(ann, thresholds: dict, scale: float = 1.0, **neuron_knobs):
    """A copy of `ann` with each ReLU replaced by an IF neuron of threshold scale x thresholds[name]."""
    from snnbench.convert import device_of, replace_modules
    from snnbench.neurons import IFNeuron

    snn = replace_modules(ann, {name: IFNeuron(threshold * scale, **neuron_knobs)
                                for name, threshold in thresholds.items()})
    return snn.to(device_of(ann))  # the new neurons' buffers join the ANN's device
