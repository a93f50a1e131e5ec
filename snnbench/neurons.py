"""The spiking neuron family: one integrate-and-fire update rule, configured by knobs.

    binary IF (baseline)       c_max=1,    neg_threshold=None
    ternary (TerMapping)       c_max=1,    neg_threshold=1.0
    augmented (AugMapping)     c_max=None, neg_threshold=1.0

Each step a neuron emits one coefficient c (0 = silent) carrying c * threshold downstream, and subtracts
what it emitted from its membrane (reset by subtraction). The simulation engine folds several time steps
into the batch dimension; only this module loops over them.
"""

import torch
from torch import nn


class IFNeuron(nn.Module):
    def __init__(
        self,
        threshold: torch.Tensor,
        v0: float = 0.0,
        c_max: int | None = 1,
        neg_threshold: float | None = None,
        require_positive_net: bool = True,
    ):
        super().__init__()
        threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if not bool((threshold > 0).all()):
            raise ValueError("neuron thresholds must be positive")
        self.register_buffer("threshold", threshold)
        self.v0 = v0
        self.c_max = c_max
        self.neg_threshold = neg_threshold
        self.require_positive_net = require_positive_net
        self.steps = 1
        self.reset(batch=0, total_steps=0)

    def reset(self, batch: int, total_steps: int):
        """Start a new sample batch: clear the membrane and the per-step counters."""
        self.batch = batch
        self.t = 0
        self.v = None
        self.net = None
        self.events = torch.zeros(total_steps, dtype=torch.float64)
        self.units = torch.zeros(total_steps, dtype=torch.float64)

    def extra_repr(self):
        kind = "per-channel" if self.threshold.dim() else f"{self.threshold.item():.4g}"
        return (f"threshold={kind}, v0={self.v0}, c_max={self.c_max}, neg_threshold={self.neg_threshold}, "
                f"require_positive_net={self.require_positive_net}")

    def _theta(self, sample_dims: int) -> torch.Tensor:
        # per-channel thresholds broadcast over the spatial dimensions of conv feature maps
        if self.threshold.dim() == 0:
            return self.threshold
        return self.threshold.view(-1, *([1] * (sample_dims - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, batch = self.steps, self.batch
        # A batch-sized input in a multi-step chunk is a constant current (direct coding, computed once).
        constant = steps > 1 and x.shape[0] == batch
        currents = x if constant else x.view(steps, batch, *x.shape[1:])
        theta = self._theta(x.dim() - 1)
        if self.v is None:
            self.v = (self.v0 * theta).expand(batch, *x.shape[1:]).clone()
            self.net = torch.zeros_like(self.v) if self.neg_threshold is not None else None
        coeffs = torch.empty((steps, batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for step in range(steps):
            self.v.add_(currents if constant else currents[step])
            self._fire(theta, coeffs[step])
        counted = coeffs.flatten(1)
        self.events[self.t:self.t + steps] += (counted != 0).sum(1).double().cpu()
        self.units[self.t:self.t + steps] += counted.abs().sum(1).double().cpu()
        self.t += steps
        return (coeffs * theta).view(steps * batch, *x.shape[1:])

    def _fire(self, theta: torch.Tensor, c: torch.Tensor):
        """Write this step's coefficients into `c` and update the membrane."""
        v = self.v
        torch.div(v, theta, rounding_mode="floor", out=c)
        c.clamp_(min=0, max=self.c_max)
        if self.neg_threshold is not None:
            # negative event: undo earlier over-firing, at least one spike, at most the net count so far
            undo = torch.div(-v, theta, rounding_mode="floor").clamp_(min=1, max=self.c_max)
            undo.mul_(v <= -self.neg_threshold * theta)
            if self.require_positive_net:
                torch.minimum(undo, self.net, out=undo)
            c.sub_(undo)
            self.net.add_(c)
        v.sub_(c * theta)
