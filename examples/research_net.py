"""A network written the way a researcher writes one, outside snnbench: a reused ReLU module, functional ReLUs,
1x1-conv + BatchNorm downsampling shortcuts, dropout and torch.flatten. snnbench converts it as it is:

    PYTHONPATH=examples snnbench run model=custom model._target_=research_net.ResearchNet model.name=research_net \
        dataset=mnist dataset.root=../shared/data train.epochs=1 sim.T=64
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Two 3x3 convs and a shortcut: the identity, or a strided 1x1 conv + BN where the shape changes."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # called twice, as in torchvision's BasicBlock
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResearchNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=32, dropout=0.1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(Block(width, width), Block(width, 2 * width, stride=2),
                                    Block(2 * width, 2 * width, stride=2))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = torch.relu(self.fc(self.dropout(x)))
        return self.head(x)
