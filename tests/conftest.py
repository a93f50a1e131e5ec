"""Shared fixtures: tiny datasets written in their real file formats, a fresh cache per test."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from snnbench.app.cli import CONF_DIR


def write_idx(path, array: np.ndarray, compress=False):
    """IDX (MNIST) format: magic 0x0000 08 <ndim>, big-endian sizes, uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_root(tmp_path):
    """A tiny MNIST in raw/ as .gz files only (like shared/data): 40 train, 20 test images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=True)
    return tmp_path


@pytest.fixture
def cifar_root(tmp_path):
    """A tiny CIFAR-10 in torchvision's pickle layout with placeholder names (md5s differ, like shared/)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": list(range(8)),
                 "batch_label": name, "filenames": [f"img{i}.png" for i in range(8)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": 8, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return tmp_path


@pytest.fixture(scope="session")
def composed_config():
    """The default config, composed once per session, in struct mode (a key the tree lacks is an error, as on the
    command line)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config")


@pytest.fixture
def cfg(composed_config, tmp_path):
    """A copy of the composed default config for one test, with a private cache."""
    config = composed_config.copy()
    config.cache_dir = str(tmp_path / "cache")
    return config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
