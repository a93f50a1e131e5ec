"""What the simulation engines drive step by step: a module with a state that lasts over the time steps of a sample
batch (IF neurons, analog operators, products of spike trains).

The contract. A caller begins a batch (`begin(total_steps)`: the state is cleared; its size comes from the first
chunk's input), then before each forward says how many steps that forward folds into the batch dimension
(`next_chunk(steps)`): an input is [steps x rows, ...], one slice of rows per step. An input whose current is the
same at every step of a chunk (direct coding: what is computed from the image once per block) is declared as such
(`declare_constant_inputs`) and comes as one slice [rows, ...]; nothing is inferred from shapes. `like` gives each
block simulated at once a copy with a state of its own."""

import abc
from collections.abc import Iterable

import torch
from torch import nn


class Stepped(nn.Module, abc.ABC):
    def __init__(self):
        super().__init__()
        self.steps = 1                                 # time steps the next forward folds into its batch dimension
        self.constant_inputs: frozenset[int] = frozenset()  # inputs (by position) constant over the steps of a chunk

    @abc.abstractmethod
    def begin(self, total_steps: int):
        """Start a new batch of samples, simulated for `total_steps` steps: clear the state and the counters."""

    def next_chunk(self, steps: int):
        """The next forward folds `steps` steps into its batch dimension."""
        self.steps = steps

    def declare_constant_inputs(self, positions: Iterable[int]):
        """The inputs (by position) that carry one current for every step of a chunk, [rows, ...]."""
        self.constant_inputs = frozenset(positions)

    def per_step(self, x: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Input `position` of this chunk as [steps, rows, ...] (a constant one repeated, as a view)."""
        if position in self.constant_inputs:
            return x.unsqueeze(0).expand(self.steps, *x.shape)
        return x.unflatten(0, (self.steps, -1))

    @classmethod
    @abc.abstractmethod
    def like(cls, module: "Stepped") -> "Stepped":
        """A module computing what `module` does (sharing its parameters and buffers), with a state of its own."""


class RepeatSteps(Stepped):
    """A current computed once per block (from the image, under direct coding) where it meets per-step values that
    are not a stepped module's input (a residual addition of class-token embeddings and attention outputs): one
    copy per step of the chunk."""

    def begin(self, total_steps: int):
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.steps, *x.shape).flatten(0, 1)

    @classmethod
    def like(cls, module: "RepeatSteps") -> "RepeatSteps":
        return cls()


def channel_dim(dims: int) -> int:
    """The channel dimension of an activation of `dims` dimensions [batch, ...], the one definition snnbench uses: the
    last of tokens [batch, tokens, features] (what nn.Linear and LayerNorm read), dimension 1 of everything else
    (a map [batch, channels, height, width], rows of features [batch, features]). Shapes alone cannot tell a
    Conv1d's [batch, channels, length] from tokens, nor Swin's channels-last maps [batch, height, width, channels]
    from images: those take this rule too."""
    return dims - 1 if dims == 3 else 1


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """`x` [batch, ...] as [channels, everything else] (channel_dim): per-channel statistics reduce its rows."""
    dim = channel_dim(x.dim())
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def broadcast_over_sample(value: torch.Tensor, sample_dims: int) -> torch.Tensor:
    """A scalar, one value per channel (channel_dim of a sample [batch, ...] of `sample_dims` dimensions) broadcast
    over the other dimensions of a sample, or one value per element shaped like one sample: the one way snnbench
    broadcasts a neuron's threshold, bias or initial potential."""
    if value.dim() in (0, sample_dims):
        return value
    after_channel = sample_dims - channel_dim(sample_dims + 1)  # the sample's dimensions after its channel
    return value.view(-1, *([1] * after_channel))
