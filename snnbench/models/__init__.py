"""The ANN architectures snnbench ships (`model=<name>` configs name them by `arch`)."""

from snnbench.models.convnet import ConvNet
from snnbench.models.resnet import ResNet

ARCHITECTURES = {"convnet": ConvNet, "resnet": ResNet}
