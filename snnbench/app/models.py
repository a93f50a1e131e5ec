"""Building the model a config names: the class or factory its `_target_` names, snnbench's own or any other."""

from torch import nn

from snnbench.app.targets import instantiated
from snnbench.core.graph import with_input_normalization
from snnbench.errors import UserError
from snnbench.models.normalize import Normalize

# model config keys that snnbench reads itself; the `_target_` receives every other key as an argument
SNNBENCH_KEYS = ("name", "normalize", "normalizes_input")


def build_model(model_cfg, dataset_cfg) -> nn.Module:
    """The class or factory `model_cfg._target_` names, built with the config's other keys (the dataset's
    values come in by interpolation: `in_channels: ${dataset.channels}`). Its input normalisation is the model
    config's `normalize` or else the dataset's, put in front of the model unless `normalizes_input` says the
    model has its own (snnbench's architectures, which take `mean` and `std`)."""
    model = instantiated(model_cfg, "model", SNNBENCH_KEYS, keys_added_by_plus=True)
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={model_cfg._target_} returned a {type(model).__name__}, not a "
                        "torch.nn.Module")
    if model_cfg.get("normalizes_input"):
        return model
    norm = model_cfg.get("normalize") or dataset_cfg
    return with_input_normalization(model, Normalize(list(norm.mean), list(norm.std)))

