"""Training and evaluation of the ANN, and the checkpoint cache shared by every run with the same recipe."""

import copy
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from snnbench.app.console import console
from snnbench.conversion.methods.ecmt import softmax_encoders
from snnbench.core.analog import Reencode
from snnbench.core.calibrate import calibrate
from snnbench.core.compensate import restore_analog_calls
from snnbench.core.graph import RELU_FUNCTIONS, RELU_METHODS, canonicalize, replace_modules, spiking_layer_names, trace
from snnbench.errors import UserError
from snnbench.io.cache import data_bytes, load_data, sha256_of
from snnbench.io.checkpoints import load_checkpoint
from snnbench.io.files import atomic_write_bytes
from snnbench.models.qcfs import QCFS
from snnbench.models.spikezip import SpikeZIPQuantizer

log = logging.getLogger("snnbench")
ACTIVATIONS = ("qcfs", "spikezip")  # train.activation: besides null, the model's own ReLUs
QCFS_INITIAL_THRESHOLD = 8.0    # the lambda every QCFS layer starts at when train.qcfs_init is null (Bu et al.'s code)
QCFS_INIT_BATCHES = 4           # training batches whose activations set lambda for train.qcfs_init=activations
QCFS_INIT_PERCENTILE = 99.9


def progress_bar(**kwargs) -> Progress:
    """A progress bar on the diagnostics console, which log lines share (they print above it, never onto it);
    none when that console is a file or a pipe."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), transient=True, console=console,
                    disable=not console.is_terminal, **kwargs)


@torch.inference_mode()
def evaluate(model: nn.Module, batches, device) -> float:
    model = model.eval().to(device)
    correct = total = 0
    for images, labels in batches:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


def with_activation(model: nn.Module, cfg, thresholds: dict[str, float] | None = None) -> nn.Module:
    """`model` with the training recipe's activation: as it is (train.activation=null), or (qcfs) a copy with
    each ReLU module a QCFS activation of train.qcfs_levels levels whose lambda starts at thresholds[name], or at
    train.qcfs_init (null: 8.0), or (spikezip) SpikeZIP-TF's quantised network (spikezip_network) whose steps
    start at thresholds[name] / the highest level (1.0 where none is given)."""
    activation = cfg.get("activation")
    if activation is None:
        return model
    if activation not in ACTIVATIONS:
        raise UserError(f"train.activation must be null (the model's own ReLUs) or one of {', '.join(ACTIVATIONS)}, "
                        f"got {activation!r}")
    if activation == "spikezip":
        levels = cfg.get("spikezip_levels")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 4:
            raise UserError(f"train.activation=spikezip needs train.spikezip_levels, the quantisation levels (an "
                            f"integer of at least 4: a signed quantiser has levels/2 - 1 positive ones), got "
                            f"{levels!r}: e.g. train.spikezip_levels=16")
        return spikezip_network(model, levels, thresholds or {})
    levels, init = cfg.get("qcfs_levels"), cfg.get("qcfs_init")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels <= 0:
        raise UserError(f"train.activation=qcfs needs train.qcfs_levels, the quantisation levels L (a positive "
                        f"integer), got {levels!r}: e.g. train.qcfs_levels=8")
    number = not isinstance(init, bool) and isinstance(init, int | float)
    if not (init is None or init == "activations" or number and init > 0):
        raise UserError(f"train.qcfs_init must be null (lambda starts at {QCFS_INITIAL_THRESHOLD}), a positive "
                        f"number or activations, got {init!r}")
    start = init if number else QCFS_INITIAL_THRESHOLD
    return replace_modules(model, {name: QCFS(levels, (thresholds or {}).get(name, start))
                                   for name in relu_modules(model)})


def spikezip_network(model: nn.Module, levels: int, thresholds: dict[str, float]) -> torch.fx.GraphModule:
    """SpikeZIP-TF's quantised ANN of `model`, to train: its canonical network with convert.nonlinear=compensate
    (a copy: BatchNorm folded, dropout removed), where every spiking layer is a SpikeZIPQuantizer of `levels` levels
    (signed where it re-encodes an analog value, but after a softmax), its step starting at thresholds[name] /
    its highest level, and every analog operator the call it stands for again (LayerNorm, GELU, softmax, the
    products of attention: so that the trained network canonicalises into the same one, its quantisers the
    spiking layers). The quantisers sit exactly where conversion puts neurons; the state_dict holds the canonical
    network's weights and each quantiser's learnt `scale`."""
    canonical = canonicalize(model, "error", "compensate").module
    unsigned = softmax_encoders(canonical)
    quantizers = {}
    for name in spiking_layer_names(canonical):
        signed = isinstance(canonical.get_submodule(name), Reencode) and name not in unsigned
        quantizer = SpikeZIPQuantizer(levels, signed)
        quantizer.scale.data.fill_(thresholds[name] / quantizer.high if name in thresholds else 1.0)
        quantizers[name] = quantizer
    network = restore_analog_calls(replace_modules(canonical, quantizers))
    network.train(model.training)
    return network


def relu_modules(model: nn.Module) -> list[str]:
    """The ReLU modules of `model`, in the order they run, each called once: the call sites a QCFS activation
    replaces. A functional or reused ReLU would share or lose its lambda, so it is refused, naming it."""
    gm = trace(model)
    modules, names = dict(gm.named_modules()), []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.ReLU):
            if node.target in names:
                raise UserError(f"train.activation=qcfs gives each ReLU module its own lambda, and {node.target} is "
                                "called more than once: give each call its own nn.ReLU")
            names.append(node.target)
        elif (node.op == "call_function" and node.target in RELU_FUNCTIONS
              or node.op == "call_method" and node.target in RELU_METHODS):
            raise UserError(f"train.activation=qcfs replaces nn.ReLU modules, and node {node.name} is a functional "
                            "ReLU: make it an nn.ReLU module")
    return names


def start_of_training(model: nn.Module, cfg, train_batches, device) -> nn.Module:
    """What training starts from: `model` with the weights of train.init_checkpoint if set (a fine-tune), in the
    recipe's activation (with_activation); for train.qcfs_init=activations each lambda starts at the 99.9th
    percentile of its ReLU's outputs on the first training batches, where a trained network's activations are;
    for train.activation=spikezip each quantiser's range (its step times its highest level) starts at the 99.9th
    percentile of its input's magnitude there, in the canonical network."""
    if cfg.get("init_checkpoint"):
        log.info("fine-tuning from %s", cfg.init_checkpoint)
        load_checkpoint(model, cfg.init_checkpoint)
    thresholds = None
    activation = cfg.get("activation")
    if activation == "spikezip" or activation is not None and cfg.get("qcfs_init") == "activations":
        batches = [images for (images, _), _ in zip(train_batches, range(QCFS_INIT_BATCHES), strict=False)]
        measured = canonicalize(model, "error", "compensate").module if activation == "spikezip" else model
        found = calibrate(measured, batches, QCFS_INIT_PERCENTILE, False, device).thresholds
        thresholds = {name: value.item() for name, value in found.items()}
    return with_activation(model, cfg, thresholds)


def init_checkpoint_sha256(path) -> str:
    """The content of the weights a fine-tune starts from (train.init_checkpoint), for the ANN's cache key."""
    if not Path(path).is_file():
        raise UserError(f"train.init_checkpoint {path} does not exist: point it at the weights to fine-tune from, "
                        "or set it to null to train from scratch")
    return sha256_of(path)


def train(model: nn.Module, train_batches, test_batches, cfg, device, progress_path=None) -> nn.Module:
    """SGD with momentum and a cosine schedule (or AdamW), after `warmup_epochs` of linear warm-up if set;
    stops with a UserError if the loss diverges.
    With `progress_path`, the state after every epoch is saved there and an interrupted training resumes
    from its last finished epoch, exactly as if it had not stopped."""
    model = model.to(device)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total_steps = max(cfg.epochs * len(train_batches), 1)
    # a very deep net can stall at chance under the full rate from step 1 (He et al. warm ResNet-110 up)
    warmup_steps = (cfg.get("warmup_epochs") or 0) * len(train_batches)

    def rate_factor(step):
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return cosine * min(1.0, (step + 1) / warmup_steps) if warmup_steps else cosine

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate_factor)
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule}
    done = _resume(progress_path, parts, train_batches.generator, device) if progress_path else 0
    with progress_bar() as bar:
        task = bar.add_task("training", total=total_steps, completed=done * len(train_batches), status="")
        for epoch in range(done + 1, cfg.epochs + 1):
            model.train()
            for step, (images, labels) in enumerate(train_batches, start=1):
                loss = F.cross_entropy(model(images.to(device)), labels.to(device),
                                       label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise UserError(f"training loss became {loss.item()} at epoch {epoch}, step {step}: "
                                    f"lower train.lr (now {cfg.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(task, advance=1, status=f"epoch {epoch} loss {loss.item():.3f}")
            accuracy = evaluate(model, test_batches, device)
            log.info("epoch %d/%d: loss %.4f, test accuracy %.2f %%", epoch, cfg.epochs, loss.item(),
                     100 * accuracy)
            if progress_path:
                _save_progress(progress_path, epoch, parts, train_batches.generator, device)
    return model.eval()


def _random_states(generator, device) -> dict:
    """Every random stream training draws from: augmentation, the shuffling order, CUDA kernels."""
    states = {"cpu": torch.get_rng_state()}
    if generator is not None:
        states["loader"] = generator.get_state()
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _save_progress(path: Path, epoch: int, parts: dict, generator, device):
    atomic_write_bytes(path, data_bytes({"epoch": epoch, "random": _random_states(generator, device),
                                         **{name: part.state_dict() for name, part in parts.items()}}))


def _resume(path: Path, parts: dict, generator, device) -> int:
    """Restore the state saved after the last finished epoch; returns that epoch (0: start afresh). A progress
    file that cannot be read or does not fit (damaged, of another layout or model) costs the epochs it held,
    never a wrong model: training restarts, from exactly the state it started from."""
    if not path.exists():
        return 0
    start = {**{name: copy.deepcopy(part.state_dict()) for name, part in parts.items()},
             "random": _random_states(generator, device)}
    try:
        saved = load_data(path)
        _restore(saved, parts, generator, device)
        if isinstance(saved["epoch"], bool) or not isinstance(saved["epoch"], int) or saved["epoch"] < 1:
            raise ValueError(f"epoch {saved['epoch']!r}")
    except Exception as err:
        _restore(start, parts, generator, device)
        log.warning("cannot resume training from %s (%s): starting from epoch 1", path, type(err).__name__)
        return 0
    log.info("resuming training after epoch %d (saved in %s)", saved["epoch"], path)
    return saved["epoch"]


def _restore(saved: dict, parts: dict, generator, device):
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    torch.set_rng_state(saved["random"]["cpu"])
    if generator is not None:
        generator.set_state(saved["random"]["loader"])
    if "cuda" in saved["random"] and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(saved["random"]["cuda"])


