"""Datasets -> train / calibration / test sets. Each dataset config names its DataSource by `_target_`. Images
are tensors in [0, 1]; each model normalises its own input, so Poisson coding can read intensities directly. Every
data file is read through `read_data_file`, and `identity` names the data a cache entry was built from."""

import gzip
import hashlib
import importlib.util
import json
import pickle
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity
from torchvision.datasets.vision import VisionDataset

from snnbench.errors import UserError, first_line
from snnbench.io.configs import class_named
from snnbench.io.files import atomic_write_bytes


@dataclass
class DataSplits:
    train: Dataset         # with augmentation, for training only
    calibration: Dataset   # the training split without augmentation: thresholds never see test images
    test: Dataset
    classes: list[str]     # the class names, in label order


def read_data_file(path: Path, read, fix: str):
    """`read(path)`: the one place snnbench reads a data file. A file that cannot be read or parsed (missing
    parts, garbage, not an image) ends the run with one line naming it and `fix`."""
    try:
        return read(path)
    except Exception as err:  # parsing arbitrary bytes fails in many ways (EOFError, UnpicklingError, OSError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"cannot read {path} ({type(err).__name__}{': ' + reason if reason else ''}): {fix}") from err


@dataclass(frozen=True, kw_only=True)
class DataSource(ABC):
    """What a dataset config's `_target_` names: a dataset built from the config's other keys (conf/dataset/*.yaml),
    which gives its splits and the files they are read from. A dataset of your own is a subclass (its own keys as
    fields with defaults) and a YAML naming it (docs/models.md); it reads any file through read_data_file."""
    name: str                # the label in reports and cache file names
    channels: int            # the images' shape, which the model configs read by interpolation
    image_size: int
    num_classes: int
    mean: list[float]        # the input normalisation each model applies (unless its config sets its own)
    std: list[float]
    root: str = "data"       # the folder the files are read from
    download: bool = False
    verify: bool = True
    augment: bool = False    # random crop (padding 4) + horizontal flip of the training split

    @abstractmethod
    def splits(self, cache_dir: Path) -> DataSplits:
        """The train, calibration and test splits; `cache_dir` may hold files derived from the data."""

    @abstractmethod
    def files(self) -> tuple[Path, list[Path]]:
        """The folder the data are read from and the files in it that `splits` reads (their names, sizes and
        modification times key the cache: `identity`)."""

    def augmentation(self):
        if not self.augment:
            return transforms.ToTensor()
        return transforms.Compose([transforms.RandomCrop(self.image_size, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])


@dataclass(frozen=True, kw_only=True)
class DigitsSource(DataSource):
    """scikit-learn's load_digits: 1797 8x8 digits shipped inside the wheel."""
    test_fraction: float = 0.25  # a fixed stratified split (random_state 0)

    def splits(self, cache_dir: Path) -> DataSplits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = read_data_file(_digits_file(), lambda path: load_digits(), "reinstall scikit-learn")
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        train_idx, test_idx = train_test_split(
            range(len(labels)), test_size=self.test_fraction, stratify=digits.target, random_state=0)
        train = TensorDataset(images[train_idx], labels[train_idx])
        return DataSplits(train, train, TensorDataset(images[test_idx], labels[test_idx]),
                          [str(name) for name in digits.target_names])

    def files(self) -> tuple[Path, list[Path]]:
        return _digits_file().parent, [_digits_file()]


def _digits_file() -> Path:
    """scikit-learn's copy of the digits, which load_digits reads (found without importing scikit-learn)."""
    package = importlib.util.find_spec("sklearn")
    return Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_root(cls, root: Path, cache_dir: Path) -> Path:
    """torchvision reads unpacked IDX files; where only the .gz files exist (or newer ones), unpack them (next to
    themselves if that folder is writable, else into the cache), so read-only copies work without the network."""
    raw = root / cls.__name__ / "raw"
    if all((raw / name).exists() for name in IDX_FILES) or not all(
            (raw / f"{name}.gz").exists() for name in IDX_FILES):
        return root
    target_root = root if _writable(raw) else cache_dir / "data"
    target = target_root / cls.__name__ / "raw"
    for name in IDX_FILES:
        packed, unpacked = raw / f"{name}.gz", target / name
        if not unpacked.exists() or unpacked.stat().st_mtime < packed.stat().st_mtime:
            data = read_data_file(packed, lambda path: gzip.decompress(path.read_bytes()),
                                  "replace it with a complete copy")
            atomic_write_bytes(unpacked, data)  # parallel sweep jobs may unpack the same file at the same time
    return target_root


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


class _IDXFiles:
    """torchvision's MNIST reading, each IDX file read through read_data_file."""

    def _load_data(self):
        split, raw = "train" if self.train else "t10k", Path(self.raw_folder)
        fix = "replace it (or the .gz it was unpacked from) with a complete copy"
        return (read_data_file(raw / f"{split}-images-idx3-ubyte", read_image_file, fix),
                read_data_file(raw / f"{split}-labels-idx1-ubyte", read_label_file, fix))


class MNIST(_IDXFiles, datasets.MNIST):  # torchvision finds the files under the class's name: MNIST/raw/
    pass


class FashionMNIST(_IDXFiles, datasets.FashionMNIST):
    pass


def _unpickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_batch(path: Path) -> dict:
    batch = _unpickle(path)
    labels = batch.get("labels", batch.get("fine_labels")) if isinstance(batch, dict) else None
    data = batch.get("data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and labels is not None
            and len(labels) == len(data)):
        raise ValueError("not a CIFAR batch (a dict of 'data': N x 3072 uint8 and N labels)")
    return {"data": data, "labels": labels}


class _CIFARFiles:
    """torchvision's CIFAR-10 / CIFAR-100, each file read through read_data_file (torchvision's own loop does
    not say which file it could not read). verify=False skips the md5 check: a re-packed copy with exact pixels."""

    def __init__(self, root, train: bool, transform, download: bool, verify: bool):
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if download:
            self.download()
        folder = Path(self.root, self.base_folder)
        found = self._check_integrity() and check_integrity(folder / self.meta["filename"], self.meta["md5"]) \
            if verify else all((folder / name).is_file() for name, _ in self.train_list + self.test_list)
        if not found:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        fix = "replace it with a complete copy (or delete it and set dataset.download=true)"
        batches = [read_data_file(folder / name, _cifar_batch, fix)
                   for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([batch["data"] for batch in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for batch in batches for label in batch["labels"]]
        self.classes = read_data_file(folder / self.meta["filename"], lambda path: _unpickle(path)[self.meta["key"]],
                                      fix)
        self.class_to_idx = {name: number for number, name in enumerate(self.classes)}


class CIFAR10(_CIFARFiles, datasets.CIFAR10):
    pass


class CIFAR100(_CIFARFiles, datasets.CIFAR100):
    pass


def _missing(source: DataSource, where: str, err=None, hint: str = "") -> UserError:
    reason = f" ({str(err).splitlines()[0]})" if err else ""
    return UserError(f"{source.name} files not found under {Path(source.root).resolve()}/{where}{reason}: "
                     f"set dataset.root=<folder holding {where}> (or env SNNBENCH_DATA){hint}")


@dataclass(frozen=True, kw_only=True)
class _TorchvisionSource(DataSource):
    """One of torchvision's datasets in its own file layout under `root`, downloaded there with download=true."""
    reader: ClassVar[type]  # the torchvision class, reading each file through read_data_file

    @property
    @abstractmethod
    def where(self) -> str:
        """Where its files lie under root (the reader's folder)."""

    @abstractmethod
    def _split(self, root: Path, train: bool, transform) -> Dataset:
        ...

    def _root(self, cache_dir: Path) -> Path:
        return Path(self.root)

    def _not_found_hint(self) -> str:
        return "" if self.download else " or dataset.download=true"

    def splits(self, cache_dir: Path) -> DataSplits:
        root = self._root(cache_dir)
        try:
            train = self._split(root, True, self.augmentation())
            return DataSplits(train, self._split(root, True, transforms.ToTensor()),
                              self._split(root, False, transforms.ToTensor()), list(train.classes))
        except RuntimeError as err:
            # missing files, or (MNIST) every download mirror unreachable
            if any(sign in str(err) for sign in ("not found", "corrupted", "Error downloading")):
                raise _missing(self, self.where, err, self._not_found_hint()) from err
            raise
        except OSError as err:  # download attempted without network
            raise _missing(self, self.where, err, self._not_found_hint()) from err


@dataclass(frozen=True, kw_only=True)
class _IDXSource(_TorchvisionSource):
    @property
    def where(self) -> str:
        return f"{self.reader.__name__}/raw/"

    def _root(self, cache_dir: Path) -> Path:
        return _idx_root(self.reader, Path(self.root), cache_dir)

    def _split(self, root: Path, train: bool, transform) -> Dataset:
        return self.reader(str(root), train=train, transform=transform, download=self.download)

    def files(self) -> tuple[Path, list[Path]]:
        """The unpacked IDX files where they sit beside the .gz, else the .gz."""
        root = Path(self.root)
        raw = root / self.where
        return root, [raw / name if (raw / name).exists() else raw / f"{name}.gz" for name in IDX_FILES]


@dataclass(frozen=True, kw_only=True)
class MNISTSource(_IDXSource):
    reader = MNIST


@dataclass(frozen=True, kw_only=True)
class FashionMNISTSource(_IDXSource):
    reader = FashionMNIST


@dataclass(frozen=True, kw_only=True)
class _CIFARSource(_TorchvisionSource):
    @property
    def where(self) -> str:
        return f"{self.reader.base_folder}/"

    def _split(self, root: Path, train: bool, transform) -> Dataset:
        return self.reader(str(root), train, transform, self.download, self.verify)

    def _not_found_hint(self) -> str:
        return super()._not_found_hint() + (
            " -- a re-packed copy with exact pixels? add dataset.verify=false" if self.verify else "")

    def files(self) -> tuple[Path, list[Path]]:
        root, cls = Path(self.root), self.reader
        folder = root / self.where
        return root, [folder / name for name, _ in cls.train_list + cls.test_list] + [folder / cls.meta["filename"]]


@dataclass(frozen=True, kw_only=True)
class CIFAR10Source(_CIFARSource):
    reader = CIFAR10


@dataclass(frozen=True, kw_only=True)
class CIFAR100Source(_CIFARSource):
    reader = CIFAR100


def _rgb_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _read_image(path: str) -> Image.Image:
    return read_data_file(Path(path), _rgb_image, "remove it from the image folder, or replace it with an image")


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with the class indices given (those of train/, also for a val/ that lacks a
    class: sorting val/'s own folders would shift every later label) and each image read through read_data_file."""

    def __init__(self, root: Path, classes: list[str], transform):
        self.given_classes = classes
        super().__init__(str(root), transform=transform, loader=_read_image, allow_empty=True)

    def find_classes(self, directory):
        return self.given_classes, {name: number for number, name in enumerate(self.given_classes)}


@dataclass(frozen=True, kw_only=True)
class ImageFolderSource(DataSource):
    """Any folder of images: root/train/<class>/*.png and root/val/<class>/*.png, resized (and centre-cropped)
    to image_size."""

    def splits(self, cache_dir: Path) -> DataSplits:
        root = Path(self.root)
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise _missing(self, "train/ and val/")
        classes, _ = datasets.folder.find_classes(str(root / "train"))
        unknown = sorted(set(datasets.folder.find_classes(str(root / "val"))[0]) - set(classes))
        if unknown:
            raise UserError(f"{root.resolve()}/val/ holds class folders that train/ lacks ({', '.join(unknown)}): "
                            "give both the same class folders")
        resize = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        plain = transforms.Compose([*resize, transforms.ToTensor()])
        augmented = transforms.Compose([*resize, self.augmentation()]) if self.augment else plain
        splits = DataSplits(_ImageFolder(root / "train", classes, augmented),
                            _ImageFolder(root / "train", classes, plain), _ImageFolder(root / "val", classes, plain),
                            classes)
        for name, split in (("train", splits.train), ("val", splits.test)):
            if len(split) == 0:
                raise UserError(f"no images in {root.resolve()}/{name}/ (<class>/<image>.png and the like): add them, "
                                "or point dataset.root at the folder that holds them")
        return splits

    def files(self) -> tuple[Path, list[Path]]:
        root = Path(self.root)
        return root, sorted(path for split in ("train", "val") for path in (root / split).rglob("*")
                            if path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS))


def data_source(cfg) -> DataSource:
    """The DataSource subclass that the dataset config's `_target_` names, built with the config's other keys."""
    keys = OmegaConf.to_container(cfg, resolve=True)
    target = keys.pop("_target_", None)
    if target is None:
        raise UserError(f"dataset {cfg.get('name')} names no _target_: add `_target_: <module>.<class>` to its config "
                        "(a snnbench.io.data.DataSource subclass, docs/models.md)")
    source_class = class_named(target, "dataset", DataSource, "snnbench.io.data.MNISTSource")
    try:
        return source_class(**keys)
    except TypeError as err:  # a key the class does not have, or one it needs missing
        raise UserError(f"cannot build dataset._target_={target} ({first_line(err)}): give the dataset config the "
                        f"keys {source_class.__name__} takes") from err


def identity(cfg) -> dict:
    """Everything that makes a dataset's images these images: its settings (image size, augmentation, ...), the
    folder it is read from and, cheaply, each file's name, size and modification time. Every cache key of
    something built from the data (a trained ANN, a calibration) holds it, so that other data -- another image
    folder, a replaced file -- never reuses an entry."""
    root, files = data_source(cfg).files()
    listing = [(str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns)
               for path in files for stat in [path.stat()]]
    # where the files are and whether they were checked is in root and files
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if k not in ("root", "download", "verify")}
    return {**settings, "root": str(root.resolve()),
            "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def build_splits(cfg, cache_dir="outputs/cache") -> DataSplits:
    """The splits of the dataset `cfg` names by `_target_`; refused when it holds more classes than
    dataset.num_classes (the model's outputs)."""
    splits = data_source(cfg).splits(Path(cache_dir))
    found = len(splits.classes)
    if found > cfg.num_classes:
        names = ", ".join(splits.classes[:5]) + (", ..." if found > 5 else "")
        raise UserError(f"dataset.num_classes={cfg.num_classes}, but the {cfg.name} data hold {found} classes "
                        f"({names}): set dataset.num_classes={found}")
    return splits


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


def shard_of(dataset: Dataset, shard: int, num_shards: int, seed: int) -> Dataset:
    """The `shard`-th of `num_shards` disjoint parts of `dataset`: every num_shards-th item of a seeded permutation,
    so the parts differ in size by at most one image and together hold every image once. One shard: all of it."""
    if num_shards == 1:
        return dataset
    if len(dataset) < num_shards:
        raise UserError(f"sim.num_shards={num_shards} is more than the {len(dataset)} evaluated images: "
                        f"lower sim.num_shards")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[shard::num_shards].tolist())
