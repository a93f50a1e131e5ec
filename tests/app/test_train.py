"""The training schedule: what the learning rate is at every step."""

import math

import pytest
import torch

from snnbench.app.models import build_model
from snnbench.app.train import train
from snnbench.io.data import build_splits, loader


@pytest.mark.parametrize("warmup_epochs", [None, 1])
def test_learning_rate_warms_up_linearly_then_follows_the_cosine(cfg, monkeypatch, warmup_epochs):
    cfg.train.epochs, cfg.train.warmup_epochs = 2, warmup_epochs
    splits = build_splits(cfg.dataset)
    batches = loader(splits.train, 512, shuffle=True)
    rates, step = [], torch.optim.SGD.step

    def recording_step(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    train(build_model(cfg.model, cfg.dataset), batches, loader(splits.test, 256), cfg.train, "cpu")
    per_epoch, total = len(batches), 2 * len(batches)
    warm = [min(1.0, (s + 1) / per_epoch) if warmup_epochs else 1.0 for s in range(total)]
    expected = [cfg.train.lr * w * 0.5 * (1 + math.cos(math.pi * s / total)) for s, w in enumerate(warm)]
    assert per_epoch > 1 and rates == pytest.approx(expected)
