"""Checks of the configured values that need neither torch nor data. `snnbench run` makes them before it imports
the pipeline (and with it torch), so that a mistyped value is refused in about a second, not after seconds of
imports; the pipeline makes them again for callers that start it directly."""

import math
import re

from omegaconf import OmegaConf

from snnbench.errors import UserError

CALIBRATION_RULES = ("percentile", "local_balancing")  # snnbench.core.calibrate.RULES, which imports torch


def positive_int(key: str, value, allow_none=False, example=32):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{key} must be a positive integer, got {value!r}: set e.g. {key}={example}")


def number_in(key: str, value, low, high=math.inf, *, low_open=False, allow_none=False, meaning="", example=None):
    """`value` must be a finite number from `low` (excluded if `low_open`) up to `high` (excluded)."""
    if value is None and allow_none:
        return
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if number and (low < value or (value == low and not low_open)) and value < high:
        return
    if high < math.inf:
        kind = f"a number in {'(' if low_open else '['}{low}, {high})"
    else:
        kind = "a positive number" if low_open else "a non-negative number"
    raise UserError(f"{key} must be {kind}{' or null' if allow_none else ''}{meaning}, got {value!r}"
                    + (f": e.g. {key}={example}" if example is not None else ""))


def check_values(cfg):
    """Reject impossible values of the stages' general keys (sim.*, train.*, calibrate.*, energy.*, seed,
    device, choices) and any number in the config that is not finite, naming the key and the fix. The methods
    check their own knobs' ranges."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {cfg.seed!r}: e.g. seed=0")
    positive_int("sim.T", cfg.sim.T)
    positive_int("sim.batch_size", cfg.sim.batch_size)
    positive_int("sim.num_samples", cfg.sim.num_samples, allow_none=True)
    positive_int("train.batch_size", cfg.train.batch_size)
    positive_int("train.num_samples", cfg.train.num_samples, allow_none=True)
    positive_int("calibrate.batch_size", cfg.calibrate.batch_size)
    positive_int("calibrate.num_batches", cfg.calibrate.num_batches)
    for key in ("sub_batch", "chunk"):
        if cfg.sim[key] != "auto":
            positive_int(f"sim.{key}", cfg.sim[key], example=16)
    for key, value in (("epochs", cfg.train.epochs), ("warmup_epochs", cfg.train.get("warmup_epochs") or 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"train.{key} must be a non-negative integer, got {value!r}")
    percentile = cfg.calibrate.percentile
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 < percentile <= 100:
        raise UserError(f"calibrate.percentile must be in (0, 100], got {percentile!r}: e.g. 99.9, or 100 for max")
    number_in("train.lr", cfg.train.lr, 0, low_open=True, example=0.05)
    number_in("train.momentum", cfg.train.momentum, 0, 1, example=0.9)
    number_in("train.weight_decay", cfg.train.weight_decay, 0, example=5e-4)
    number_in("train.label_smoothing", cfg.train.label_smoothing, 0, 1, example=0.1)
    for key, example in (("mac_pj", 4.6), ("ac_pj", 0.9)):
        number_in(f"energy.{key}", cfg.energy[key], 0, meaning=" (picojoules per operation)", example=example)
    number_in("sim.max_memory_mb", cfg.sim.max_memory_mb, 0, low_open=True, allow_none=True,
              meaning=" (megabytes the activations of a chunk may take; null: half the free memory)", example=4096)
    choices = {"sim.coding": (cfg.sim.coding, ("direct", "poisson")),
               "calibrate.rule": (cfg.calibrate.rule, CALIBRATION_RULES),
               "sim.split": (cfg.sim.split, ("test", "train")),
               "convert.maxpool": (cfg.convert.maxpool, ("error", "avg")),
               "convert.nonlinear": (cfg.convert.nonlinear, ("refuse", "compensate")),
               "model.pool": (cfg.model.get("pool", "avg"), ("avg", "max")),
               "train.optimizer": (cfg.train.optimizer, ("sgd", "adamw"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.train.get("activation") == "spikezip" and cfg.convert.nonlinear != "compensate":
        # refused before training, not after it, when the trained network is canonicalised
        raise UserError("train.activation=spikezip trains quantisers where convert.nonlinear=compensate puts spiking "
                        "layers, around LayerNorm, GELU, softmax and attention: add convert.nonlinear=compensate")
    if cfg.sim.channels_last not in ("auto", True, False):
        raise UserError(f"sim.channels_last must be auto, true or false, got {cfg.sim.channels_last!r}")
    if not isinstance(cfg.calibrate.per_channel, bool):
        raise UserError(f"calibrate.per_channel must be true or false, got {cfg.calibrate.per_channel!r}")
    check_device(cfg.device)
    if not isinstance(cfg.cache_dir, str) or not cfg.cache_dir:
        raise UserError(f"cache_dir must name a folder, got {cfg.cache_dir!r}: e.g. cache_dir=outputs/cache (or "
                        "unset it)")
    settings = {key: value for key, value in cfg.items() if key != "hydra"}  # Hydra's own keys are not the run's
    # unresolved: a value interpolated from another key (model.std: ${dataset.std}) is named where it is set
    for key, value in _numbers(OmegaConf.to_container(OmegaConf.create(settings), resolve=False)):
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")


def _numbers(node, key=""):
    """(dotted key, value) of every float in a config container, however deep (lists too)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        if isinstance(node, float):
            yield key, node
        return
    for name, value in items:
        yield from _numbers(value, f"{key}[{name}]" if isinstance(name, int) else f"{key}.{name}" if key else name)


def check_device(name):
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N (N: a GPU's index), got {name!r}")


def check_overrides(overrides: list[str], groups: list[str], model_has_target: bool = False):
    """Refuse `+key=value` and `++key=value`, which add keys to the config (Hydra adds them without a word, and
    no stage reads a key the config does not already have), and `~key`, which removes one the stages read.
    Config group choices (`+experiment=...`) and Hydra's own keys are Hydra's to check; a model built from
    `_target_` receives every `+model.<key>` as an argument."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.split("/")[0] in groups or key.startswith("hydra"):
            continue
        if model_has_target and key.startswith("model.") and not override.is_delete():
            continue
        if override.is_add() or override.is_force_add():
            raise UserError(f"unknown config key '{key}' ({override.input_line}): no stage reads a key added with + "
                            f"or ++; `snnbench run --cfg job` prints the valid keys (change one with {key}=...)")
        if override.is_delete():
            raise UserError(f"{override.input_line} removes the config key '{key}', which the stages read: "
                            f"set it instead ({key}=...)")
