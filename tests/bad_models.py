"""Models that trace and canonicalise but cannot be converted or scored, for the refusals of `snnbench run` and
`snnbench inspect` (tests/app/test_bad_input.py): importable as `bad_models.<Name>` from tests/. Each is built for
the digits (1 x 8 x 8 images, 10 classes)."""

import torch
from torch import nn


class ReturnsTuple(nn.Module):
    """Logits and features, as models written for distillation return them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = torch.relu(self.fc(torch.flatten(x, 1)))
        return self.head(features), features


class ReturnsDict(ReturnsTuple):
    def forward(self, x):
        return {"logits": self.head(torch.relu(self.fc(torch.flatten(x, 1))))}


class NoReLU(nn.Module):
    """A linear classifier: nothing to become a spiking neuron."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class NoParameters(nn.Module):
    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(x), (1, 10)), 1)


class TooDeep(nn.Module):
    """Four 2x2 poolings: an 8x8 image is 1x1 after three."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pools = nn.Sequential(*(nn.AvgPool2d(2) for _ in range(4)))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pools(torch.relu(self.conv(x))), 1))


class PooledToNothing(TooDeep):
    """Adaptive pooling to 0 x 0."""

    def __init__(self):
        super().__init__()
        self.pools = nn.AdaptiveAvgPool2d(0)


class FiveClasses(NoReLU):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.relu(torch.flatten(x, 1)))
