"""ANN-function-preserving rewrites of the residual neurons of a canonical network (TTRBR, docs/methods.md):
the spiking layers fed by an addition, out = ReLU(F(x) + shortcut(x)), in any residual network.

    none             the network as trained: the post-addition neuron receives x's raw spikes
    shortcut_neuron  a ReLU on the shortcut path: the shortcut spikes pass one calibrated neuron layer of their
                     own before the addition, like the residual branch does. Needs shortcuts that carry a neuron's
                     output unchanged (identity, or option A's subsampling and zero padding), so that the new ReLU
                     changes nothing in the ANN
    merged           option-A blocks, F(x) = conv2(ReLU(conv1(x))): the shortcut rides through conv1 as extra
                     identity channels (stride 2 for option A), shares the first neurons, and is added back inside
                     conv2 by an identity kernel
    split            every post-addition neuron becomes `copies` neurons per channel, each fed 1/copies of the sum,
                     their outputs added: ReLU(z) = sum of ReLU(z / k). In the SNN the copies start at staggered
                     membrane potentials (SplitReLU.phases), so together they round the sum to threshold / k

The neurons that `shortcut_neuron` and `merged` add on the shortcut are calibrated on x itself, so their
thresholds are about those of the neurons that emitted x's spikes: they relay the spikes nearly one for one and
add no precision, only thresholds the tuning can move. `split` changes what the post-addition neuron can
represent, at the price of up to `copies` events per channel and step (docs/ttrbr.md).
"""

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from snnbench.core.graph import ClippedReLU, unique_name
from snnbench.errors import UserError

KINDS = ("none", "shortcut_neuron", "merged", "split")
ADDITIONS = {operator.add, torch.add}
OPTION_A_SUBSAMPLING = (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2))


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


@dataclass(frozen=True)
class Restructuring:
    """restructure()'s arguments as data: what rebuilds the rewritten network from the canonical one (a saved
    conversion, snnbench.conversion.saved)."""
    kind: str = "none"
    copies: int = 1
    example_shape: tuple[int, ...] = ()  # of a batch of the input: only the feature maps' sizes matter

    def apply(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return restructure(model, self.kind, self.copies, torch.zeros(self.example_shape))


def restructure(model: torch.fx.GraphModule, kind: str, copies: int, example: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of the canonical network `model` with its residual neurons rewritten as `kind` (`copies`: neurons
    per channel for `split`; `example`: a batch of its input, for the feature maps' sizes); the logits are
    unchanged."""
    if kind not in KINDS:
        raise UserError(f"method.restructure must be one of {', '.join(KINDS)}, got {kind!r}")
    gm = copy.deepcopy(model)
    if kind == "none":
        return gm
    modules = dict(gm.named_modules())
    # a clipped ReLU after an addition stays as it is: the rewrites compute unclipped ReLUs
    residual = [node for node in gm.graph.nodes if node.op == "call_module" and isinstance(
        modules[node.target], nn.ReLU) and not isinstance(modules[node.target], ClippedReLU)
        and _is_addition(node.args[0])]
    if not residual and kind != "split":  # split has nothing to split in a network without additions
        raise UserError(f"method.restructure={kind} rewrites the neurons after residual additions, and this model "
                        "has none: use method.restructure=none")
    if kind == "split":
        with torch.inference_mode():
            ShapeProp(gm).propagate(example.to(next(gm.parameters()).device))
        for node in residual:
            gm.add_submodule(node.target, SplitReLU(node.meta["tensor_meta"].shape[1], copies))
    for node in residual if kind in ("shortcut_neuron", "merged") else ():
        addition = node.args[0]
        (_merge if kind == "merged" else _shortcut_neuron)(gm, node, addition, modules)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _is_addition(node) -> bool:
    return isinstance(node, torch.fx.Node) and (node.op == "call_function" and node.target in ADDITIONS
                                                or node.op == "call_method" and node.target in ("add", "add_"))


def _relayed_neuron(node, modules):
    """The neuron whose output `node` carries unchanged (through identities, option A's subsampling and zero
    padding), or None."""
    while True:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.ReLU):
            return node
        if isinstance(module, nn.Identity) or node.op == "call_function" and (
                node.target is F.pad or node.target is operator.getitem):
            node = node.args[0]
        else:
            return None


def _shortcut_neuron(gm, neuron, addition, modules):
    shortcut = next((arg for arg in addition.args[:2] if _relayed_neuron(arg, modules) is not None), None)
    if shortcut is None:
        raise UserError(f"method.restructure=shortcut_neuron needs shortcuts that carry a neuron's output unchanged "
                        f"(identity or option A), but the addition before {neuron.target} adds two computed "
                        "branches (a 1x1-conv shortcut?): use method.restructure=split or none")
    parent = neuron.target.rpartition(".")[0]
    name = unique_name(gm, f"{parent}.shortcut_relu" if parent else "shortcut_relu")
    gm.add_submodule(name, nn.ReLU())
    with gm.graph.inserting_before(addition):
        relayed = gm.graph.call_module(name, (shortcut,))
    addition.replace_input_with(shortcut, relayed)


def _merge(gm, neuron, addition, modules):
    """Rewrite the block ending in `addition` as described for `merged`, or refuse naming it."""
    for branch, shortcut in (addition.args[:2], reversed(addition.args[:2])):
        match = _option_a_block(branch, shortcut, modules, gm)
        if match:
            conv1, conv2, pad = match
            first, second = _merged_convs(modules[conv1.target], modules[conv2.target], pad)
            gm.add_submodule(conv1.target, first)
            gm.add_submodule(conv2.target, second)
            addition.replace_all_uses_with(conv2)
            return
    raise UserError(f"method.restructure=merged applies to option-A residual blocks (ReLU(conv2(ReLU(conv1(x))) + "
                    f"shortcut(x)) with 3x3 convs and an identity or subsample-and-zero-pad shortcut), and the block "
                    f"before {neuron.target} is not one: use method.restructure=split or none")


def _option_a_block(branch, shortcut, modules, gm):
    """(conv1, conv2, channels padded on each side) when branch = conv2(ReLU(conv1(x))) with 3x3 convs of padding
    1 and shortcut = x (conv1 stride 1) or x subsampled by 2 and zero-padded in channels (conv1 stride 2), for a
    neuron output x; else None."""
    def single_call(node, kind):
        if not (isinstance(node, torch.fx.Node) and node.op == "call_module"
                and isinstance(modules[node.target], kind) and len(node.users) == 1):
            return False
        return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1

    def three_by_three(conv, stride):
        return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (stride, stride)
                and conv.groups == 1 and conv.dilation == (1, 1))

    if not (single_call(branch, nn.Conv2d) and single_call(branch.args[0], nn.ReLU)
            and single_call(branch.args[0].args[0], nn.Conv2d)):
        return None
    conv2, conv1 = branch, branch.args[0].args[0]
    x = conv1.args[0]
    while isinstance(modules.get(shortcut.target) if shortcut.op == "call_module" else None, nn.Identity):
        shortcut = shortcut.args[0]
    if _relayed_neuron(x, modules) is not x or not three_by_three(modules[conv2.target], 1):
        return None
    if shortcut is x and three_by_three(modules[conv1.target], 1):
        return conv1, conv2, 0
    if (isinstance(shortcut, torch.fx.Node) and shortcut.op == "call_function" and shortcut.target is F.pad
            and three_by_three(modules[conv1.target], 2)):
        subsampled, widths = shortcut.args[0], shortcut.args[1]
        if (subsampled.op == "call_function" and subsampled.target is operator.getitem and subsampled.args[0] is x
                and tuple(subsampled.args[1]) == OPTION_A_SUBSAMPLING and len(widths) == 6
                and tuple(widths[:4]) == (0, 0, 0, 0) and widths[4] == widths[5]
                and shortcut.kwargs.get("value") in (None, 0)):
            return conv1, conv2, widths[4]
    return None


def _identity_kernel(out_channels: int, in_channels: int, offset: int, device) -> torch.Tensor:
    """3x3 kernels mapping input channel k to output channel offset + k through the centre tap."""
    kernel = torch.zeros(out_channels, in_channels, 3, 3, device=device)
    for k in range(in_channels):
        kernel[offset + k, k, 1, 1] = 1.0
    return kernel


def _merged_convs(conv1: nn.Conv2d, conv2: nn.Conv2d, pad: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """conv1 also copies x (subsampled by its stride) into extra channels, which the ReLU between passes unchanged
    (x >= 0); conv2 adds them to its output channels shifted by option A's zero padding."""
    carried = conv1.in_channels
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
    return first, second
