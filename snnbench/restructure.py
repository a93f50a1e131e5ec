"""ANN-function-preserving rewrites of the CIFAR ResNet's BasicBlock, out = ReLU(F(x) + shortcut(x)), that
change what the spiking neuron after the addition receives (TTRBR, METHODS.md). The block input x is a ReLU
output (x >= 0), and the option-A shortcut only subsamples and zero-pads it, so ReLU(shortcut(x)) = shortcut(x).

    none             the block as trained: the post-addition neuron receives x's raw spikes
    shortcut_neuron  a ReLU on the shortcut path: the shortcut spikes pass one calibrated neuron layer of their
                     own before the addition, like the residual branch does
    merged           the shortcut rides through the block's first conv as extra identity channels (stride 2 for
                     option A), shares relu1's neurons, and is added back inside conv2 by an identity kernel
    split            the post-addition neuron becomes `copies` neurons per channel, each fed 1/copies of the sum,
                     their outputs added: ReLU(z) = sum of ReLU(z / k). In the SNN the copies start at staggered
                     membrane potentials (SplitReLU.phases), so together they round the sum to threshold / k

The neurons that `shortcut_neuron` and `merged` add on the shortcut are calibrated on x itself, so their
thresholds are about those of the neurons that emitted x's spikes: they relay the spikes nearly one for one and
add no precision, only thresholds the tuning can move. `split` changes what the post-addition neuron can
represent, at the price of up to `copies` events per channel and step (docs/ttrbr.md).
"""

from collections import OrderedDict

import torch
from torch import nn

from snnbench.convert import fold_batchnorm
from snnbench.errors import UserError
from snnbench.models.resnet import BasicBlock, ShortcutA

KINDS = ("none", "shortcut_neuron", "merged", "split")


class SplitReLU(nn.Module):
    """ReLU(z) = sum over k copies of ReLU(z / k), with the copies as k blocks of channels of one ReLU layer."""

    def __init__(self, channels: int, copies: int):
        super().__init__()
        self.channels, self.copies = channels, copies
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(torch.cat([x / self.copies] * self.copies, 1))
        total = out[:, :self.channels]
        for i in range(1, self.copies):
            total = total + out[:, i * self.channels:(i + 1) * self.channels]
        return total

    def phases(self, v0: float) -> torch.Tensor:
        """Initial membrane potential of each copy's neurons, in units of the threshold: copy i starts at
        (i + v0) / k. Fed the same current, the k copies then emit together floor(k S / theta + v0) spikes of
        theta / k for a running input sum S (Hermite's identity: sum_i floor(y + i / k) = floor(k y)), where one
        neuron emits floor(S / theta + v0) of theta (while S does not fall and each step adds at most theta)."""
        return ((torch.arange(self.copies) + v0) / self.copies).repeat_interleave(self.channels)


def restructure(model: nn.Module, kind: str, copies: int = 2) -> nn.Module:
    """A BN-folded copy of `model` with every BasicBlock rewritten as `kind` (`copies`: neurons per channel
    for `split`); the logits are unchanged."""
    if kind not in KINDS:
        raise UserError(f"method.restructure must be one of {', '.join(KINDS)}, got {kind!r}")
    model = fold_batchnorm(model)
    if kind == "none":
        return model
    for name, block in list(model.named_modules()):
        if isinstance(block, BasicBlock):
            if kind == "shortcut_neuron":
                block.shortcut = nn.Sequential(block.shortcut, nn.ReLU())
            elif kind == "split":
                block.relu2 = SplitReLU(block.conv2.out_channels, copies)
            else:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, _merged(block))
    return model


def _identity_kernel(out_channels: int, in_channels: int, offset: int, device) -> torch.Tensor:
    """3x3 kernels mapping input channel k to output channel offset + k through the centre tap."""
    kernel = torch.zeros(out_channels, in_channels, 3, 3, device=device)
    for k in range(in_channels):
        kernel[offset + k, k, 1, 1] = 1.0
    return kernel


def _merged(block: BasicBlock) -> nn.Sequential:
    """conv1 also copies x (subsampled by its stride) into extra channels; relu1 passes them unchanged (x >= 0);
    conv2 adds them to its output channels shifted by option A's zero padding."""
    conv1, conv2 = block.conv1, block.conv2
    carried = conv1.in_channels
    pad = block.shortcut.pad_channels if isinstance(block.shortcut, ShortcutA) else 0
    device = conv1.weight.device
    first = nn.Conv2d(carried, conv1.out_channels + carried, 3, stride=conv1.stride, padding=1, device=device)
    second = nn.Conv2d(conv2.in_channels + carried, conv2.out_channels, 3, padding=1, device=device)
    with torch.no_grad():
        first.weight.copy_(torch.cat([conv1.weight, _identity_kernel(carried, carried, 0, device)]))
        first.bias.zero_()
        if conv1.bias is not None:
            first.bias[:conv1.out_channels] = conv1.bias
        shortcut = _identity_kernel(conv2.out_channels, carried, pad, device)
        second.weight.copy_(torch.cat([conv2.weight, shortcut], dim=1))
        second.bias.copy_(conv2.bias if conv2.bias is not None else torch.zeros(conv2.out_channels, device=device))
    return nn.Sequential(OrderedDict(conv1=first, relu1=block.relu1, conv2=second, relu2=block.relu2))
