"""Dataset registry -> train / calibration / test sets. Images are tensors in [0, 1]; each model normalises
its own input, so Poisson coding can read intensities directly."""

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from snnbench.errors import UserError


@dataclass
class DataSplits:
    train: Dataset         # with augmentation, for training only
    calibration: Dataset   # the training split without augmentation: thresholds never see test images
    test: Dataset


def load_digits_splits(cfg) -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=cfg.test_fraction, stratify=digits.target, random_state=0)
    train = TensorDataset(images[train_idx], labels[train_idx])
    return DataSplits(train, train, TensorDataset(images[test_idx], labels[test_idx]))


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_root(cls, root: Path, cache_dir: Path) -> Path:
    """torchvision reads unpacked IDX files; when only the .gz files exist, unpack them (next to themselves
    if that folder is writable, else into the cache), so read-only copies work without the network."""
    raw = root / cls.__name__ / "raw"
    if all((raw / name).exists() for name in IDX_FILES) or not all(
            (raw / f"{name}.gz").exists() for name in IDX_FILES):
        return root
    target_root = root if _writable(raw) else cache_dir / "data"
    target = target_root / cls.__name__ / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if not (target / name).exists():
            # a temporary name of its own: parallel sweep jobs may unpack the same file at the same time
            fd, partial = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".partial")
            with gzip.open(raw / f"{name}.gz", "rb") as src, open(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
            Path(partial).rename(target / name)
    return target_root


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


class UncheckedCIFAR10(datasets.CIFAR10):
    """CIFAR-10 re-packed with exact pixels but other file names: skip the md5 check (dataset.verify=false)."""

    meta = {**datasets.CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / name).is_file()
                   for name, _ in self.train_list + self.test_list)


class UncheckedCIFAR100(datasets.CIFAR100):
    meta = {**datasets.CIFAR100.meta, "md5": None}
    _check_integrity = UncheckedCIFAR10._check_integrity


TORCHVISION = {
    "mnist": (datasets.MNIST, datasets.MNIST),
    "fashion_mnist": (datasets.FashionMNIST, datasets.FashionMNIST),
    "cifar10": (datasets.CIFAR10, UncheckedCIFAR10),
    "cifar100": (datasets.CIFAR100, UncheckedCIFAR100),
}
WHERE = {"mnist": "MNIST/raw/", "fashion_mnist": "FashionMNIST/raw/", "cifar10": "cifar-10-batches-py/",
         "cifar100": "cifar-100-python/", "imagefolder": "train/ and val/"}


def _augmentation(cfg):
    if not cfg.augment:
        return transforms.ToTensor()
    return transforms.Compose([transforms.RandomCrop(cfg.image_size, padding=4),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def _missing(cfg, root, err=None) -> UserError:
    reason = f" ({str(err).splitlines()[0]})" if err else ""
    hint = " or dataset.download=true" if cfg.name in TORCHVISION and not cfg.download else ""
    return UserError(f"{cfg.name} files not found under {Path(root).resolve()}/{WHERE[cfg.name]}{reason}: "
                     f"set dataset.root=<folder holding {WHERE[cfg.name]}> (or env SNNBENCH_DATA){hint}")


def load_torchvision_splits(cfg, cache_dir) -> DataSplits:
    checked, unchecked = TORCHVISION[cfg.name]
    cls = checked if cfg.verify else unchecked
    root = Path(cfg.root)
    if cfg.name in ("mnist", "fashion_mnist"):
        root = _idx_root(cls, root, Path(cache_dir))
    try:
        def split(train, transform):
            return cls(str(root), train=train, transform=transform, download=cfg.download)

        return DataSplits(split(True, _augmentation(cfg)), split(True, transforms.ToTensor()),
                          split(False, transforms.ToTensor()))
    except RuntimeError as err:
        # missing files, or (MNIST) every download mirror unreachable
        if any(sign in str(err) for sign in ("not found", "corrupted", "Error downloading")):
            hint = (" -- a re-packed copy with exact pixels? add dataset.verify=false"
                    if cfg.verify and cfg.name.startswith("cifar") else "")
            raise UserError(f"{_missing(cfg, cfg.root, err)}{hint}") from err
        raise
    except OSError as err:  # download attempted without network
        raise _missing(cfg, cfg.root, err) from err


def load_imagefolder_splits(cfg) -> DataSplits:
    root = Path(cfg.root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise _missing(cfg, root)
    resize = [transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size)]
    plain = transforms.Compose([*resize, transforms.ToTensor()])
    augmented = transforms.Compose([*resize, _augmentation(cfg)]) if cfg.augment else plain
    train = datasets.ImageFolder(str(root / "train"), transform=augmented)
    return DataSplits(train, datasets.ImageFolder(str(root / "train"), transform=plain),
                      datasets.ImageFolder(str(root / "val"), transform=plain))


def build_splits(cfg, cache_dir="outputs/cache") -> DataSplits:
    if cfg.name == "digits":
        return load_digits_splits(cfg)
    if cfg.name == "imagefolder":
        return load_imagefolder_splits(cfg)
    return load_torchvision_splits(cfg, cache_dir)


def seeded_subset(dataset: Dataset, size: int | None, seed: int, skip: int = 0) -> Dataset:
    """`size` items drawn at random (the same ones for the same seed), in random order; all if size is None.
    `skip` passes over the first items of that order: the ones a smaller draw with this seed returned."""
    if skip == 0 and (size is None or size >= len(dataset)):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[skip:]
    return Subset(dataset, order[:size].tolist())


def loader(dataset: Dataset, batch_size: int, *, shuffle=False, seed=0, limit=None, num_workers=0):
    """A DataLoader; `limit` keeps a seeded random subset (shuffled) or the first `limit` items."""
    if limit is not None and limit < len(dataset):
        if shuffle:
            dataset = seeded_subset(dataset, limit, seed)
            shuffle = False
        else:
            dataset = Subset(dataset, range(limit))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers)
