"""How snnbench reads a model, without data or training: its spiking layers (canonical name, the call each came
from, output shape, neurons per image, fan-out) and what canonicalisation folded, removed or replaced. `snnbench
inspect` prints it; snnbench.inspect returns it."""

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from snnbench.core.analog import ANALOG, REENCODING, SPIKE_PRODUCT, SPIKING, Reencode, spike_products
from snnbench.core.analysis import fan_out
from snnbench.core.graph import canonicalize

LAYER_COLUMNS = ["layer", "origin", "output_shape", "neurons", "fan_out", "kind"]


@dataclass
class Inspection:
    layers: pd.DataFrame   # one row per spiking layer, then per analog operator or product of spike trains:
                           # LAYER_COLUMNS (origin: the call it came from; neurons per image, an analog
                           # operator's or product's output values; fan_out: synapses per
                           # neuron; kind: snnbench.core.analog.layer_kind's)
    parameters: int        # of the canonical network (BatchNorm folded)
    folded: list[str]      # "bn -> conv" for each BatchNorm folded
    removed: list[str]     # Dropout calls, and a softmax / log_softmax / sigmoid that ends the classifier
    replaced: list[str]    # max poolings swapped for average pooling (maxpool="avg")
    affine: list[str]      # BatchNorms kept as affine maps (after an addition, a concatenation, ...)

    @property
    def neurons(self) -> int:
        """Neurons per image in all spiking layers."""
        return int(self.layers[~self.layers.kind.isin([ANALOG, SPIKE_PRODUCT])].neurons.sum())


def inspect(model: nn.Module, input_shape: tuple[int, ...], maxpool: str = "error",
            nonlinear: str = "refuse") -> Inspection:
    """The spiking layers of `model` for inputs of `input_shape` (one image, without the batch dimension); a model
    that cannot be converted raises the UserError that names the first node in the way."""
    result = canonicalize(model, maxpool, nonlinear)
    canonical = result.module.cpu()
    with torch.inference_mode():
        ShapeProp(canonical).propagate(torch.zeros(1, *input_shape))
    shapes = {node.target: tuple(node.meta["tensor_meta"].shape[1:]) for node in canonical.graph.nodes
              if node.op == "call_module" and (node.target in result.layers or node.target in result.analog)}
    fans = fan_out(canonical)
    products = spike_products(canonical)
    kinds = {name: REENCODING if isinstance(canonical.get_submodule(name), Reencode) else SPIKING
             for name in result.layers}
    layers = pd.DataFrame([(name, origin, shapes[name], math.prod(shapes[name]), fans[name], kinds[name])
                           for name, origin in result.layers.items()]
                          + [(name, origin, shapes[name], math.prod(shapes[name]), math.nan,
                              SPIKE_PRODUCT if name in products else ANALOG)
                             for name, origin in result.analog.items()], columns=LAYER_COLUMNS)
    return Inspection(layers, sum(p.numel() for p in canonical.parameters()), result.folded, result.removed,
                      result.replaced, result.affine)
