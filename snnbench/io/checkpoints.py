"""Loading a user's weights: strictly, safely (weights_only), every failure named with its fix."""

from pathlib import Path

import torch
from torch import nn

from snnbench.errors import UserError


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
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "an infinity"
            raise UserError(f"checkpoint {path} holds {kind} in {key}: its weights are unusable (a training that "
                            "diverged?); point train.checkpoint at a checkpoint whose weights are finite")
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
