"""The ANN architectures snnbench ships; their `model=<name>` configs name them by `_target_`."""

from snnbench.models.convnet import ConvNet
from snnbench.models.resnet import ResNet

__all__ = ["ConvNet", "ResNet"]
