"""The quantisation-clip-floor-shift activation of Bu et al. (ICLR 2022; putshua/SNN_conversion_QCFS,
modules.py MyFloor): lambda x clamp(floor(x L / lambda + 1/2) / L, 0, 1), with a straight-through floor and a
learnable lambda. Trained in place of a ReLU, it is what an IF neuron of threshold lambda, starting at lambda / 2,
computes in L steps: the converted network equals the quantised one at T = L."""

import torch
from torch import nn


class QCFS(nn.ReLU):
    """A ReLU call site trained quantised: for the converter it is a spiking layer like any ReLU (a subclass, so
    the canonical graph, calibration and fan-out treat it as one), whose threshold is its learnt lambda. One
    module per call site: canonicalize gives a reused module's later calls plain ReLUs."""

    def __init__(self, levels: int, threshold: float = 8.0):
        super().__init__()
        self.levels = levels
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))  # lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x * (self.levels / self.threshold) + 0.5
        floored = scaled + (torch.floor(scaled) - scaled).detach()  # the floor forward, the identity backward
        return self.threshold * torch.clamp(floored / self.levels, 0, 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={self.threshold.item():.4g}"
