import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so data stay in [0, 1] (what Poisson coding needs)
    and checkpoints carry no normalisation keys (the buffers are not persistent)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(-1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std
