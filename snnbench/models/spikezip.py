"""The quantiser of SpikeZIP-TF's quantised ANN (You et al., ICML 2024, arXiv 2406.03470; their code's MyQuan):
s x clamp(floor(x / s + 1/2), low, high) with a learnt step s (LSQ: a straight-through floor, the gradient of s
scaled by 1 / sqrt(high x elements)), over `levels` levels: 0 .. levels-1 for a tensor that is never negative,
-levels/2 .. levels/2-1 for a signed one. Trained where the converted network has its spiking layers, it is what
SpikeZIP-TF's ST-BIF neuron of threshold s settles to (snnbench.conversion.methods.spikezip)."""

import math

import torch
from torch import nn


class SpikeZIPQuantizer(nn.ReLU):
    """A spiking layer of a canonical network trained quantised: a ReLU subclass, so that canonicalize, calibration
    and fan-out treat it as a spiking layer, with its learnt step `scale` (the converted neuron's threshold)."""

    def __init__(self, levels: int, signed: bool, scale: float = 1.0):
        super().__init__()
        self.levels, self.signed = levels, signed
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    @property
    def low(self) -> int:
        """The lowest level (times the step): the least the quantised value, and the ST-BIF's least net count."""
        return -(self.levels // 2) if self.signed else 0

    @property
    def high(self) -> int:
        return self.levels // 2 - 1 if self.signed else self.levels - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the values forward are exactly s and the floor (each straight-through term adds y - y = 0), so that the
        # converted neurons, of threshold s, settle to these values bit for bit
        scaled = self.scale * (1.0 / math.sqrt(self.high * x.numel()))
        step = self.scale.detach() + (scaled - scaled.detach())  # s forward, the scaled gradient backward
        levels = x / step + 0.5
        floored = torch.floor(levels).detach() + (levels - levels.detach())  # the identity's gradient backward
        return torch.clamp(floored, self.low, self.high) * step

    def extra_repr(self) -> str:
        return f"levels={self.levels}, signed={self.signed}, scale={self.scale.item():.4g}"
