"""Building the model a config names: one of snnbench's architectures (`arch`) or any `_target_`."""

from torch import nn

from snnbench.core.graph import with_input_normalization
from snnbench.errors import UserError
from snnbench.models import ARCHITECTURES
from snnbench.models.normalize import Normalize

# model config keys that snnbench reads itself; a `_target_` model receives every other key as an argument
SNNBENCH_KEYS = ("name", "arch", "normalize", "normalizes_input")


def build_model(model_cfg, dataset_cfg) -> nn.Module:
    """The model for a dataset: one of snnbench's architectures (`arch`), or any class or factory named by
    `_target_` with the other keys as its arguments. Its input normalisation is the model config's `normalize`
    or else the dataset's; a `_target_` model gets it put in front unless `normalizes_input` says it has its own."""
    norm = model_cfg.get("normalize") or dataset_cfg
    if "_target_" not in model_cfg:
        options = {k: v for k, v in model_cfg.items() if k not in SNNBENCH_KEYS}
        return ARCHITECTURES[model_cfg.arch](
            in_channels=dataset_cfg.channels, image_size=dataset_cfg.image_size,
            num_classes=dataset_cfg.num_classes, mean=list(norm.mean), std=list(norm.std), **options)
    model = _instantiate(model_cfg)
    if model_cfg.get("normalizes_input"):
        return model
    return with_input_normalization(model, Normalize(list(norm.mean), list(norm.std)))


def _instantiate(model_cfg) -> nn.Module:
    import hydra.utils
    from omegaconf import OmegaConf

    arguments = OmegaConf.create({k: v for k, v in model_cfg.items() if k not in SNNBENCH_KEYS})
    target = model_cfg._target_
    try:
        model = hydra.utils.instantiate(arguments, _convert_="all")
    except Exception as err:  # hydra wraps the import or constructor failure; its last line is the cause
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise UserError(f"cannot build model._target_={target} ({type(cause).__name__}: {reason}): the target must "
                        "be importable (from the working directory or PYTHONPATH) and accept the model keys given "
                        "(add new ones with +model.<key>=...)") from err
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
