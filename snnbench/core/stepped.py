"""What the simulation engines drive step by step: a module with a state that lasts over the time steps of a sample
batch (IF neurons, analog operators). The engines reset every such module before a batch, tell it how many steps
the next forward folds into the batch dimension, and give each block simulated at once a copy with a state of its
own."""

import abc

from torch import nn


class Stepped(nn.Module, abc.ABC):
    steps: int  # time steps folded into the batch dimension of the next forward (the engine sets it)

    @abc.abstractmethod
    def reset(self, batch: int, total_steps: int):
        """Start a new batch of `batch` samples, simulated for `total_steps` steps."""

    @classmethod
    @abc.abstractmethod
    def like(cls, module: "Stepped") -> "Stepped":
        """A module computing what `module` does (sharing its parameters and buffers), with a state of its own."""
