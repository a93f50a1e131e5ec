"""Training and evaluation of the ANN, and the checkpoint cache shared by every run with the same recipe."""

import fcntl
import hashlib
import io
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from snnbench.errors import UserError
from snnbench.report import atomic_write_bytes

log = logging.getLogger("snnbench")


def progress_bar(**kwargs) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), transient=True, **kwargs)


@torch.inference_mode()
def evaluate(model: nn.Module, batches, device) -> float:
    model = model.eval().to(device)
    correct = total = 0
    for images, labels in batches:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


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
    buffer = io.BytesIO()
    torch.save({"epoch": epoch, "random": _random_states(generator, device),
                **{name: part.state_dict() for name, part in parts.items()}}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _resume(path: Path, parts: dict, generator, device) -> int:
    """Restore the state saved after the last finished epoch; returns that epoch (0: start afresh)."""
    if not path.exists():
        return 0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged progress file costs the epochs it held, never a wrong model
        log.warning("cannot resume training from %s (%s): starting from epoch 1", path, type(err).__name__)
        return 0
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    torch.set_rng_state(saved["random"]["cpu"])
    if generator is not None:
        generator.set_state(saved["random"]["loader"])
    if "cuda" in saved["random"] and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(saved["random"]["cuda"])
    log.info("resuming training after epoch %d (saved in %s)", saved["epoch"], path)
    return saved["epoch"]


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def claimed(path: Path):
    """Hold an exclusive lock on `path`.lock: parallel sweep jobs wait instead of building the same entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(path: Path, key: str, build, save, load):
    """Load the cache entry at `path` if its recorded sha256 and config key match; otherwise build it (once,
    under a lock), save it atomically and record both. Returns (value, sha256, was_cached)."""
    meta_path = path.with_suffix(".json")
    with claimed(path):
        if path.exists() or meta_path.exists():
            entry = _load_verified(path, meta_path, key, load)
            if entry:
                return *entry, True
            log.warning("cache entry %s does not match its recorded sha256 and config key, or cannot be loaded "
                        "(corrupted, or left by an interrupted run): rebuilding it", path)
        value = build()
        atomic_write_bytes(path, save(value))
        digest = sha256_of(path)
        atomic_write_bytes(meta_path, json.dumps({"key": key, "sha256": digest}).encode())
        return value, digest, False


def _load_verified(path: Path, meta_path: Path, key: str, load):
    """(value, sha256) of a cache entry whose file matches its record (sha256 and config key), else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key or meta["sha256"] != sha256_of(path):
            return None
        return load(path), meta["sha256"]
    except Exception:  # a missing, damaged or unloadable part: the entry is rebuilt, never used
        return None
