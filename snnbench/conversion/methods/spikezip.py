"""SpikeZIP-TF (You, Xu, Nie, Deng, Guo, Wang, He, "SpikeZIP-TF: Conversion is All You Need for Transformer-based
SNN", ICML 2024, arXiv 2406.03470; github.com/Intelligent-Computing-Research-Group/SpikeZIP-TF): the ANN is trained
quantised (train.activation=spikezip: snnbench.models.spikezip, a quantiser of L levels with a learnt step s at
every spiking layer of the convert.nonlinear=compensate network), and each quantiser becomes their spike-tracer
bipolar IF neuron (ST-BIF): threshold s, membrane starting at half of it, at most one spike a step, positive when
the membrane reaches s, negative when it falls below 0, and none that would take the net count of spikes out of
the quantiser's levels. Fed a constant input it settles to the quantised value: the network is the quantised ANN.

SpikeZIP-TF's network is equivalent in sums: the image enters once, each layer's output summed up to t is the
quantised ANN's value of its input summed up to t (LayerNorm and softmax emit f(sum to t) - f(sum to t-1), the
attention products the increments of the products of the sums). snnbench's network is equivalent in means (the
image every step, f of the mean with expectation compensation, products of the means): the neuron here runs the
ST-BIF on the mean of its input so far (its input summed to t is that mean) and emits the increment of t times the
value it settled to, t x N_t x s - (t-1) x N_(t-1) x s, N_t its net count. So at every t the mean output of each
layer here is the sum of SpikeZIP-TF's, step for step, and where they settle both are the quantised ANN. What a
neuron emits is an integer multiple of s: one event of coefficient N_(t-1) + t x (its spike), counted as such."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from snnbench.conversion.methods import Method, check_number, converted
from snnbench.core.analog import analog_operators
from snnbench.core.graph import device_of, replace_modules, spiking_layer_names
from snnbench.core.neurons import IFNeuron
from snnbench.core.stepped import broadcast_over_sample
from snnbench.errors import UserError
from snnbench.models.spikezip import SpikeZIPQuantizer

TRAINED = ("spikezip converts the quantised ANN of SpikeZIP-TF: add train.activation=spikezip "
           "train.spikezip_levels=16 (and train.init_checkpoint=<weights> to fine-tune a trained network)")


@dataclass(frozen=True)
class SpikeZIP(Method):
    name: str = "spikezip"
    trained_with: str | None = "spikezip"  # the ANN's training activation (the CLI: train.activation); spikezip
    v0: float = 0.5                        # initial membrane potential, in units of the threshold
    needs_analog_operators: ClassVar[bool] = True

    def validate(self):
        if self.trained_with != "spikezip":
            raise UserError(f"method={TRAINED}")
        check_number("v0", self.v0, example=0.5)

    def convert(self, ann, calibration, batches, context):
        neurons = {}
        for name in spiking_layer_names(ann):
            quantizer = ann.get_submodule(name)
            if not isinstance(quantizer, SpikeZIPQuantizer):
                raise UserError(f"spiking layer {name} is no SpikeZIP-TF quantiser, and method={TRAINED}")
            if quantizer.scale.item() <= 0:
                raise UserError(f"SpikeZIP-TF quantiser {name} learnt the step {quantizer.scale.item():.4g}, which "
                                "cannot be a threshold: train again with a lower train.lr")
            neurons[name] = SpikeTracerNeuron(quantizer.scale.detach().clone(), self.v0, low=quantizer.low,
                                              high=quantizer.high)
        snn = replace_modules(ann, neurons)
        snn = replace_modules(snn, analog_operators(snn)).to(device_of(ann))
        thresholds = {name: neuron.threshold for name, neuron in neurons.items()}
        return converted(ann, dataclasses.replace(calibration, thresholds=thresholds), snn)


class SpikeTracerNeuron(IFNeuron):
    """SpikeZIP-TF's ST-BIF neuron on the running mean of its input (module docstring): net count N in
    [low, high], one spike a step. Its emitted coefficients are not bounded (c_max None), and it is signed
    (neg_threshold 0: its negative spikes fire below 0)."""

    def __init__(self, threshold: torch.Tensor, v0: float | torch.Tensor = 0.5, c_max: int | None = None,
                 neg_threshold: float | None = 0.0, require_positive_net: bool = False,
                 emits_coefficients: bool = False, bias: torch.Tensor | None = None, *, low: int = 0,
                 high: int = 1):
        super().__init__(threshold, v0, None, 0.0, False, emits_coefficients, bias)
        self.register_buffer("low", torch.tensor(float(low)))  # the net count's range: the quantiser's levels
        self.register_buffer("high", torch.tensor(float(high)))

    @classmethod
    def like(cls, neuron: "SpikeTracerNeuron", emits_coefficients: bool | None = None) -> "SpikeTracerNeuron":
        copy = super().like(neuron, emits_coefficients)
        copy.low, copy.high = neuron.low, neuron.high
        return copy

    def begin(self, total_steps: int):
        super().begin(total_steps)
        self.sum = None  # the input summed over the steps so far

    def extra_repr(self):
        return f"{super().extra_repr()}, levels={self.low.item():g}..{self.high.item():g}"

    def _run_steps(self, x: torch.Tensor, constant: bool, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        steps, rows = self.steps, len(self.v)
        currents = x if constant else x.view(steps, rows, *x.shape[1:])
        if self.sum is None:
            self.sum = torch.zeros_like(self.v)
        v0 = broadcast_over_sample(self.v0, x.dim() - 1)
        out = out.view(steps, rows, *x.shape[1:])
        counts = torch.empty((2, steps, rows), dtype=x.dtype, device=x.device)
        for step in range(steps):
            t = self.t + step + 1
            self.sum += currents if constant else currents[step]
            # the ST-BIF's membrane, in thresholds, fed the mean input so far: v0 + mean / theta - N
            membrane = v0 + self.sum / t / theta - self.net
            up, down = (membrane >= 1) & (self.net < self.high), (membrane < 0) & (self.net > self.low)
            spike = up.to(x.dtype) - down.to(x.dtype)
            c = self.net + t * spike  # t N_t - (t-1) N_(t-1)
            self.net += spike
            torch.mul(c, 1.0 if self.emits_coefficients else theta, out=out[step])
            self._count(c, c, counts[:, step])  # c is not read again: its own scratch
        return counts.double().sum(2)
