"""`snnbench inspect`: how snnbench reads a model, without data or training — its spiking layers (canonical name,
the call each came from, output shape, neurons per image, fan-out), what was folded, removed or replaced, or the
first node that stops the conversion."""

from rich.console import Console
from rich.table import Table

from snnbench import api
from snnbench.app.models import build_model
from snnbench.app.pipeline import validate
from snnbench.core.analog import ANALOG, SPIKING
from snnbench.core.convertible import check_convertible


def inspect_model(cfg, console: Console):
    """Print the spiking layers of cfg.model built for cfg.dataset (random weights: only the structure counts);
    a model that cannot be converted raises the UserError that `run` would."""
    validate(cfg)
    model = build_model(cfg.model, cfg.dataset)
    check_convertible(model, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.num_classes,
                      cfg.convert.maxpool, cfg.convert.nonlinear)  # as `run` checks it before training
    found = api.inspect(model, (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size),
                        cfg.convert.maxpool, cfg.convert.nonlinear)
    analog = found.layers[found.layers.kind == ANALOG]
    title = f"{cfg.model.name} on {cfg.dataset.name}: {len(found.layers) - len(analog)} spiking layers"
    table = Table(title=title + (f", {len(analog)} analog operators" if len(analog) else ""))
    kinds = (found.layers.kind != SPIKING).any()  # a network of spiking layers only: the title says so
    for column in ("layer", *(["kind"] if kinds else []), "from", "output shape", "neurons / image", "fan-out"):
        table.add_column(column, justify="right" if column in ("neurons / image", "fan-out") else "left")
    for layer in found.layers.itertuples(index=False):
        table.add_row(layer.layer, *([layer.kind] if kinds else []), layer.origin,
                      "x".join(map(str, layer.output_shape)), f"{layer.neurons:,}",
                      "-" if layer.kind == ANALOG else f"{layer.fan_out:,.4g}")
    console.print(table)
    console.print(f"{found.parameters:,} parameters after folding; {found.neurons:,} neurons per image",
                  highlight=False)
    for label, items in (("folded", found.folded), ("kept as affine maps", found.affine), ("removed", found.removed),
                         ("replaced", found.replaced)):
        console.print(f"{label} ({len(items)}): {', '.join(items) if items else '-'}", highlight=False,
                      soft_wrap=True)
