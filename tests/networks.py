"""Small networks and images the tests of several packages share, and the spiking network's mean output."""

import torch
from torch import nn

from snnbench.conversion.methods import spiking_copy
from snnbench.core.analog import Reencode
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import canonicalize
from snnbench.core.stepped import Stepped
from snnbench.models.resnet import ResNet
from snnbench.models.vit import vision_transformer


def snn_of(model, images, **knobs):
    ann = canonicalize(model, nonlinear="compensate").module
    calibration = calibrate(ann, [images], 100, False, "cpu")  # calibrated by the maximum
    assert set(calibration.thresholds) >= {name for name, m in ann.named_modules() if isinstance(m, Reencode)}
    return ann, spiking_copy(ann, calibration.thresholds, **knobs)


@torch.inference_mode()
def mean_outputs(snn, images, T):
    """The spiking network's output summed over T steps, divided by T (one chunk of T steps, the images given at
    every step: every input of every stepped module is per step, whatever a simulation of `snn` declared)."""
    for module in snn.modules():
        if isinstance(module, Stepped):
            module.declare_constant_inputs(())
            module.begin(T)
            module.next_chunk(T)
    return snn(images.repeat(T, 1, 1, 1)).view(T, len(images), -1).mean(0)


def randomised(model):
    """Non-trivial BatchNorm statistics, so folding has something to get wrong, and no layer of zeros (torchvision
    initialises ViT's head to zero: its logits would be 0 for every image, equal whatever the conversion does)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


def tiny_vit(seed=0, classes=5):
    """A torchvision ViT of two blocks of two heads on 8x8 images, random, its head (torchvision's zeros)
    initialised so that the logits differ."""
    torch.manual_seed(seed)
    model = vision_transformer(in_channels=1, image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                               mlp_dim=32, num_classes=classes)
    nn.init.normal_(model.heads.head.weight, std=0.3)
    return model.eval()


def digits_vit():
    """tiny_vit for the 8x8 digits (model=custom in a run)."""
    return tiny_vit(classes=10)


class HandWrittenAttention(nn.Module):
    """One attention block as papers write it: q @ k.transpose(-2, -1), a scale, softmax, @ v."""

    def __init__(self, dim=12, heads=2, classes=4):
        super().__init__()
        self.embed, self.qkv, self.proj = nn.Linear(16, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.head = heads, nn.Linear(dim, classes)

    def tokens(self, x):
        return self.embed(x.view(x.shape[0], 4, 16))  # four rows of 4x4 pixels: four tokens

    def attend(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)

    def forward(self, x):
        x = self.tokens(x)
        x = x + self.proj(self.attend(x))
        return self.head(x.mean(1))


def tiny_resnet():
    """ResNet-8 (one block per stage, both option-A shortcuts) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = ResNet(8, in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def canonical_resnet():
    return canonicalize(tiny_resnet()).module


def rgb_images(n=16, seed=1):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
