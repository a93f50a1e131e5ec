"""ANN definitions and loading of external checkpoints."""

from pathlib import Path

import torch
from torch import nn

from snnbench.errors import UserError
from snnbench.models.convnet import ConvNet
from snnbench.models.normalize import Normalize
from snnbench.models.resnet import ResNet

ARCHITECTURES = {"convnet": ConvNet, "resnet": ResNet}
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


def with_input_normalization(model: nn.Module, normalize: Normalize) -> nn.Module:
    """`model` traced (the same submodules and state_dict keys) with `normalize` applied to its input first."""
    from snnbench.convert import trainable_trace, unique_name

    gm = trainable_trace(model)
    graph = gm.graph
    name = unique_name(gm, "normalize")
    gm.add_submodule(name, normalize)
    image = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(image):
        normalized = graph.call_module(name, (image,))
    image.replace_all_uses_with(normalized, delete_user_cb=lambda user: user is not normalized)
    graph.lint()
    gm.recompile()
    return gm


def _load_failure(err: Exception) -> str:
    """The informative line of a torch.load error: the Python object the safe loader refused, where it names one,
    else the first line after its preamble, which only advises unsafe loading."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL" in line]
    if refused:
        return f"{type(err).__name__}: {refused[0].split(' was not an allowed global')[0].rstrip('.')}"
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0].split('. ')[0]}"


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load weights strictly (weights_only): a raw state_dict or {'state_dict': ...}, DataParallel prefixes
    stripped. Every way this can fail becomes a UserError naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory: point train.checkpoint at the weights file in it")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: fix train.checkpoint (or set it to null to train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling arbitrary bytes fails in many ways (KeyError, UnicodeDecodeError, ...)
        reason = _load_failure(err)
        if "GLOBAL" in reason:  # a class or function to import: the file holds code, not only tensors
            raise UserError(f"{path} holds Python objects besides tensors ({reason}), which a safe load "
                            "(weights_only) refuses: re-save it as torch.save(model.state_dict(), path)") from err
        raise UserError(f"{path} is not a PyTorch checkpoint, or it is truncated or corrupted ({reason}): "
                        "point train.checkpoint at a complete file saved with torch.save") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict of tensors; save the model's state_dict()")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatch (checkpoint vs model)", mismatched)) if keys]
        raise UserError(f"checkpoint {path} does not match the model ({'; '.join(parts)}); "
                        "choose the model= it was trained with")
    model.load_state_dict(state, strict=False)
    return model
