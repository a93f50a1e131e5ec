"""A small pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks"): every block is
BatchNorm -> ReLU -> conv, twice, and its output is the sum of that branch and the shortcut, so each BatchNorm
after the first reads an addition, not a convolution. snnbench keeps such BatchNorms as affine maps of the spiking
network (docs/models.md):

    PYTHONPATH=examples snnbench run model=custom model._target_=preact_resnet.PreActResNet model.name=preact_resnet \
        dataset=mnist dataset.root=../shared/data
"""

from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward(self, x):
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(width, width, 1), PreActBlock(width, 2 * width, 2),
                                    PreActBlock(2 * width, 4 * width, 2))
        self.bn = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(x.flatten(1))
