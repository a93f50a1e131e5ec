"""`snnbench inspect`: how snnbench reads a model, without data or training — its spiking layers (canonical name,
the call each came from, output shape, neurons per image, fan-out), what was folded, removed or replaced, or the
first node that stops the conversion."""

import math

import torch
from rich.console import Console
from rich.table import Table
from torch.fx.passes.shape_prop import ShapeProp

from snnbench.app.models import build_model
from snnbench.app.pipeline import validate
from snnbench.core.analysis import fan_out
from snnbench.core.graph import canonicalize


def inspect_model(cfg, console: Console):
    """Print the spiking layers of cfg.model built for cfg.dataset (random weights: only the structure counts);
    a model that cannot be converted raises the UserError that `run` would."""
    validate(cfg)
    model = build_model(cfg.model, cfg.dataset)
    result = canonicalize(model, cfg.convert.maxpool)
    canonical = result.module
    image = torch.zeros(1, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    with torch.inference_mode():
        ShapeProp(canonical).propagate(image)
    shapes = {node.target: tuple(node.meta["tensor_meta"].shape[1:]) for node in canonical.graph.nodes
              if node.op == "call_module" and node.target in result.layers}
    fans = fan_out(canonical)
    table = Table(title=f"{cfg.model.name} on {cfg.dataset.name}: {len(result.layers)} spiking layers")
    for column in ("layer", "from", "output shape", "neurons / image", "fan-out"):
        table.add_column(column, justify="right" if column in ("neurons / image", "fan-out") else "left")
    for name, origin in result.layers.items():
        table.add_row(name, origin, "x".join(map(str, shapes[name])), f"{math.prod(shapes[name]):,}",
                      f"{fans[name]:,.4g}")
    console.print(table)
    parameters = sum(p.numel() for p in canonical.parameters())
    console.print(f"{parameters:,} parameters after folding; "
                  f"{sum(math.prod(s) for s in shapes.values()):,} neurons per image", highlight=False)
    for label, items in (("folded", result.folded), ("removed", result.removed), ("replaced", result.replaced)):
        console.print(f"{label} ({len(items)}): {', '.join(items) if items else '-'}", highlight=False,
                      soft_wrap=True)
