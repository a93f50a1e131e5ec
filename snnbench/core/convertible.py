"""The checks a model must pass before any data is read or any epoch trained, shared by `snnbench run` and
`snnbench inspect`: it canonicalises (snnbench.core.graph), it has parameters and at least one ReLU to become a
spiking layer, and on one image of the dataset's size every layer computes an output that is not empty and the
forward returns one tensor of logits, one per class. Each refusal is one line naming the layer or the output."""

import torch
import torch.fx
from torch import nn

from snnbench.core.graph import _describe, _source_line, canonicalize
from snnbench.errors import UserError


def check_convertible(model: nn.Module, channels: int, image_size: int, num_classes: int,
                      maxpool: str = "error", nonlinear: str = "refuse"):
    """Canonicalise `model` and run it on one blank channels x image_size x image_size image (weights as they
    are: only the structure counts); a UserError says why it cannot be converted."""
    canonical = canonicalize(model, maxpool, nonlinear)
    if not any(True for _ in canonical.module.parameters()):
        raise UserError("the model has no parameters (no conv or linear layer): there are no weights to train or "
                        "convert; give it at least one nn.Conv2d or nn.Linear")
    if not canonical.layers:
        raise UserError("the model has no ReLU, so nothing becomes a spiking neuron: put a ReLU (nn.ReLU, F.relu) "
                        "after its conv or linear layers")
    image = torch.zeros(1, channels, image_size, image_size)
    with torch.inference_mode():
        logits = _NamingFailures(canonical.module, f"{channels}x{image_size}x{image_size}").run(image)
    if not isinstance(logits, torch.Tensor):
        kind = "dict" if isinstance(logits, dict) else type(logits).__name__  # fx returns its own immutable_dict
        raise UserError(f"the model's forward returns a {kind}, not one tensor of logits: return "
                        "only the logits (batch x classes), e.g. `return logits` instead of a tuple or dict")
    if tuple(logits.shape) != (1, num_classes):
        raise UserError(f"the model's output has shape {'x'.join(map(str, logits.shape))} for one image, not 1x"
                        f"{num_classes} (one logit per class of the dataset, dataset.num_classes={num_classes}): "
                        f"give the model {num_classes} outputs (e.g. +model.num_classes={num_classes})")


class _NamingFailures(torch.fx.Interpreter):
    """Runs a canonical network node by node on an image of `size` ("CxHxW"); a node that fails, or whose output
    is empty, is refused by name."""

    def __init__(self, module: torch.fx.GraphModule, size: str):
        super().__init__(module)
        self.extra_traceback = False  # fx would append the failing node's graph and trace to our one line
        self.size, self.modules = size, dict(module.named_modules())

    def run_node(self, node):
        if node.op in ("placeholder", "output"):
            return super().run_node(node)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        where = f"{_describe(node, module)}{_source_line(node)}"
        try:
            value = super().run_node(node)
        except Exception as err:  # e.g. "Output size is too small", or layers whose shapes do not fit
            reason = (str(err).strip().splitlines() or [""])[0]
            if "too small" in reason:
                raise UserError(f"the model shrinks a {self.size} image to nothing at {where} ({reason}): it is "
                                "too deep for the dataset's image size; use a shallower model or fewer poolings") \
                    from err
            raise UserError(f"the model fails on a {self.size} image at {where} ({type(err).__name__}: {reason}): "
                            "its layers do not fit the dataset's image size and channels, or each other") from err
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            raise UserError(f"the model shrinks a {self.size} image to nothing at {where} (output "
                            f"{'x'.join(map(str, value.shape[1:]))}): it is too deep for the dataset's image size; "
                            "use a shallower model or fewer poolings")
        return value
