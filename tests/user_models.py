"""Networks written the way researchers write them, outside the package, for the conversion tests: importable as
`user_models.<Name>` (tests/ is on sys.path)."""

import torch
import torch.nn.functional as F
from torch import nn


class Mixed(nn.Module):
    """Every ReLU form at once: one ReLU module called twice (in place), F.relu, torch.relu, Tensor.relu_, a
    channel concatenation, a 1x1-conv + BN downsampling shortcut, an identity shortcut added in place, dropout and
    torch.flatten. Ten ReLU call sites."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.side = nn.Conv2d(width, width, 1)
        self.down_conv = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.down_conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.down_bn2 = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(2 * width))
        self.head_conv = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.dropout = nn.Dropout(0.2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, 32)
        self.fc2 = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.stem_bn(self.stem(x)))                       # 1: nn.ReLU, first call
        out = self.relu(self.bn1(self.conv1(x)))                        # 2: the same module again
        out = self.bn2(self.conv2(out))
        out += x
        out = F.relu(out)                                               # 3: F.relu after an in-place addition
        branch = torch.relu(self.side(x) * 0.5)                         # 4: torch.relu of a scaled conv
        y = torch.cat([out, branch], 1)
        down = F.relu(self.down_bn(self.down_conv(y)), inplace=True)    # 5: F.relu in place
        down = self.down_bn2(self.down_conv2(down))
        z = down + self.shortcut(y)
        z.relu_()                                                       # 6: Tensor.relu_ as a statement
        z = self.relu(self.head_conv(z))                                # 7: the reused module, third call
        z = torch.flatten(self.pool(self.dropout(z)), 1)
        z = self.fc(F.dropout(z, 0.1, self.training)).relu()            # 8: Tensor.relu after functional dropout
        z = F.relu(self.fc2(z))                                         # 9: F.relu
        return self.classifier(torch.relu(z - 0.0))                     # 10: torch.relu of an affine map


class WithGelu(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


class GatedProduct(nn.Module):
    """A product of two activations: not a linear map of spikes."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.a = nn.Linear(in_channels * 64, 16)
        self.b = nn.Linear(in_channels * 64, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc(torch.relu(self.a(x)) * torch.relu(self.b(x)))


def mixed_factory(width=8, num_classes=10):
    """A factory, as `_target_` may name one instead of a class."""
    return Mixed(in_channels=1, num_classes=num_classes, width=width)
