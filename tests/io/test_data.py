import logging
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from snnbench.app.models import build_model
from snnbench.errors import UserError
from snnbench.io import data
from snnbench.io.configs import CONF_DIR
from snnbench.io.data import build_splits, seeded_subset


def use_dataset(cfg, name: str, **keys):
    """`cfg` with dataset=<name> (conf/dataset/<name>.yaml) and `keys` set, as `dataset=<name> dataset.<key>=...`
    on the command line would."""
    config = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
    config.pop("defaults")
    cfg.dataset = {**OmegaConf.to_container(config), **keys}
    return cfg


def test_digits_split_is_fixed_and_stratified(cfg):
    first, second = build_splits(cfg.dataset), build_splits(cfg.dataset)
    assert len(first.train) + len(first.test) == 1797
    assert torch.equal(first.test.tensors[0], second.test.tensors[0])
    counts = torch.bincount(first.test.tensors[1])
    assert counts.min() >= 40 and counts.max() <= 50
    assert 0 <= first.train.tensors[0].min() and first.train.tensors[0].max() <= 1


def test_mnist_reads_gz_idx_files_from_a_read_only_folder(cfg, idx_root, tmp_path, monkeypatch):
    use_dataset(cfg, "mnist", root=str(idx_root))
    monkeypatch.setattr(data, "_writable", lambda folder: False)  # root ignores chmod: simulate read-only
    splits = build_splits(cfg.dataset, tmp_path / "cache")
    assert len(splits.train) == 40 and len(splits.test) == 20
    image, label = splits.test[3]
    assert image.shape == (1, 28, 28) and label == 3
    assert (tmp_path / "cache" / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


def test_cifar10_repacked_copy_needs_verify_false(cfg, cifar_root, tmp_path):
    use_dataset(cfg, "cifar10", root=str(cifar_root), verify=True)
    with pytest.raises(UserError, match="dataset.verify=false"):
        build_splits(cfg.dataset, tmp_path)
    cfg.dataset.verify = False
    splits = build_splits(cfg.dataset, tmp_path)
    assert len(splits.train) == 40 and len(splits.test) == 8
    image, label = splits.calibration[5]
    assert image.shape == (3, 32, 32) and label == 5


def test_missing_files_say_where_and_how(cfg, tmp_path):
    use_dataset(cfg, "fashion_mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"FashionMNIST/raw/.*dataset.root="):
        build_splits(cfg.dataset, tmp_path)


def test_train_num_samples_trains_on_a_seeded_subset_and_keys_the_cache(cfg, monkeypatch):
    from snnbench.app import pipeline

    seen = []

    def fake_train(model, train_batches, test_batches, train_cfg, device, progress):
        images = train_batches.dataset
        seen.append(sorted(images.indices) if hasattr(images, "indices") else list(range(len(images))))
        return model

    monkeypatch.setattr(pipeline, "train", fake_train)
    splits = build_splits(cfg.dataset)
    cfg.train.num_samples = 100
    _, first, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    pipeline.Path(first).unlink()
    pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    cfg.train.num_samples = None
    _, full, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    assert len(seen[0]) == 100 and seen[0] == seen[1]  # the same images every time
    assert len(set(seen[0])) == 100 and max(seen[0]) < len(splits.train)
    assert len(seen[2]) == len(splits.train)
    assert first != full  # a subset is another recipe: its own cache entry


def test_sim_split_train_evaluates_training_images(cfg, tmp_path):
    from snnbench.app import pipeline

    cfg.train.epochs, cfg.sim.T, cfg.sim.split = 1, 2, "train"
    summary = pipeline.run(cfg, tmp_path)
    splits = build_splits(cfg.dataset)
    calibrated = cfg.calibrate.batch_size * cfg.calibrate.num_batches
    assert summary["split"] == "train" and summary["num_test_images"] == len(splits.calibration) - calibrated


def test_held_out_training_images_are_the_ones_the_calibration_does_not_draw():
    dataset = list(range(100))
    calibration = seeded_subset(dataset, 30, seed=3)
    held_out = seeded_subset(dataset, None, seed=3, skip=30)
    assert len(held_out) == 70 and sorted([*calibration, *held_out]) == dataset


def test_sim_split_train_never_scores_a_calibration_image(cfg):
    from snnbench.app import pipeline

    cfg.sim.split = "train"
    splits = build_splits(cfg.dataset)
    calibrated = {image.numpy().tobytes() for batch in pipeline.calibration_images(cfg, splits) for image in batch}
    evaluated = pipeline.evaluated_images(cfg, splits)
    assert len(calibrated) == cfg.calibrate.batch_size * cfg.calibrate.num_batches  # distinct images
    assert not any(image.numpy().tobytes() in calibrated for image, _ in evaluated)


def test_sim_split_train_refuses_when_the_calibration_uses_every_training_image(cfg, tmp_path):
    from snnbench.app import pipeline

    cfg.sim.split, cfg.calibrate.num_batches = "train", 100
    with pytest.raises(UserError, match="lower calibrate.num_batches"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # refused before any work


def write_image_folder(root, classes=("a", "b", "c"), per_class=4, seed=0, splits=("train", "val")):
    """root/<split>/<class>/<n>.png: small random RGB images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{number}.png")
    return root


def image_folder_cfg(cfg, root, num_classes=3):
    return use_dataset(cfg, "imagefolder", root=str(root), image_size=8, num_classes=num_classes, augment=False)


def test_two_image_folders_never_share_a_cached_ann_or_calibration(cfg, tmp_path, caplog):
    from snnbench.app import pipeline

    caplog.set_level(logging.INFO, logger="snnbench")
    cfg.train.epochs, cfg.sim.T, cfg.calibrate.batch_size, cfg.calibrate.num_batches = 1, 2, 4, 1
    summaries = []
    for seed in (0, 1):  # the same names, classes and sizes; other pixels
        root = write_image_folder(tmp_path / f"images{seed}", seed=seed)
        caplog.clear()
        summaries.append(pipeline.run(image_folder_cfg(cfg, root), tmp_path / f"run{seed}"))
        assert "training ANN" in caplog.text and "using cached ANN" not in caplog.text
        assert "calibrating" in caplog.text and "using cached calibration" not in caplog.text
    assert summaries[0]["checkpoint_sha256"] != summaries[1]["checkpoint_sha256"]
    assert len(list((tmp_path / "cache" / "ann").glob("*_*.pt"))) == 2
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pt"))) == 2

    caplog.clear()  # the same folder again: its entries are used
    pipeline.run(image_folder_cfg(cfg, tmp_path / "images1"), tmp_path / "again")
    assert "using cached ANN" in caplog.text and "using cached calibration" in caplog.text


def test_data_identity_follows_the_files(cfg, tmp_path, idx_root):
    root = write_image_folder(tmp_path / "images")
    image_folder_cfg(cfg, root)
    first = data.identity(cfg.dataset)
    assert data.identity(cfg.dataset) == first  # cheap and stable: names, sizes, modification times
    (root / "train" / "b" / "2.png").write_bytes((root / "train" / "b" / "1.png").read_bytes())  # a replaced image
    assert data.identity(cfg.dataset)["files"] != first["files"]
    # MNIST unpacked beside its .gz files on the first read: the files a second read finds are the same
    use_dataset(cfg, "mnist", root=str(idx_root))
    build_splits(cfg.dataset, tmp_path / "cache")
    unpacked = data.identity(cfg.dataset)
    build_splits(cfg.dataset, tmp_path / "cache")
    assert data.identity(cfg.dataset) == unpacked


def test_image_that_is_not_an_image_is_named(cfg, tmp_path):
    from snnbench.app.cli import describe

    root = write_image_folder(tmp_path / "images")
    bad = root / "train" / "b" / "2.png"
    bad.write_text("I am a text file with an image's name\n")
    splits = build_splits(image_folder_cfg(cfg, root).dataset)
    expected = (f"cannot read {bad} (UnidentifiedImageError: cannot identify image file '{bad}'): remove it from the "
                "image folder, or replace it with an image")
    for workers in (0, 1):  # a DataLoader worker re-raises the error inside its traceback: the line is the same
        with pytest.raises(UserError) as raised:
            for _ in data.loader(splits.calibration, 4, num_workers=workers):
                pass
        assert describe(raised.value) == expected


def test_val_folder_missing_a_class_keeps_every_label(cfg, tmp_path):
    root = write_image_folder(tmp_path / "images", splits=("train",))
    write_image_folder(root, classes=("c",), splits=("val",))
    splits = build_splits(image_folder_cfg(cfg, root).dataset)
    assert splits.classes == ["a", "b", "c"]
    assert {label for _, label in splits.test} == {2}  # sorted on its own, val/ would have called c class 0


def test_val_folder_with_a_class_train_lacks_is_refused(cfg, tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), splits=("train",))
    write_image_folder(root, classes=("a", "z"), splits=("val",))
    with pytest.raises(UserError) as raised:
        build_splits(image_folder_cfg(cfg, root).dataset)
    assert str(raised.value) == (f"{root}/val/ holds class folders that train/ lacks (z): give both the same class "
                                 "folders")


@pytest.mark.parametrize("dataset", ["imagefolder", "mnist"])
def test_fewer_num_classes_than_the_data_hold_is_refused(cfg, tmp_path, idx_root, dataset):
    if dataset == "imagefolder":
        image_folder_cfg(cfg, write_image_folder(tmp_path / "images"), num_classes=2)
        expected = "dataset.num_classes=2, but the imagefolder data hold 3 classes (a, b, c): set dataset.num_classes=3"
    else:
        use_dataset(cfg, "mnist", root=str(idx_root), num_classes=5)
        expected = ("dataset.num_classes=5, but the mnist data hold 10 classes (0 - zero, 1 - one, 2 - two, 3 - three, "
                    "4 - four, ...): set dataset.num_classes=10")
    with pytest.raises(UserError) as raised:
        build_splits(cfg.dataset, tmp_path / "cache")
    assert str(raised.value) == expected


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
    path.write_bytes(bytes(range(256)) * 8)


@pytest.mark.parametrize("damage, reason", [(truncate, r"EOFError: Compressed file ended before the end-of-stream "
                                                       r"marker was reached"),
                                            (garble, r"BadGzipFile: Not a gzipped file \(b'\\x00\\x01'\)")])
def test_damaged_mnist_gz_is_named_and_leaves_no_partial_file(cfg, tmp_path, idx_root, damage, reason):
    packed = idx_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    damage(packed)
    use_dataset(cfg, "mnist", root=str(idx_root))
    for _ in range(2):  # every attempt: the same line, nothing left behind
        with pytest.raises(UserError) as raised:
            build_splits(cfg.dataset, tmp_path / "cache")
        assert re.fullmatch(rf"cannot read {re.escape(str(packed))} \({reason}\): replace it with a complete copy",
                            str(raised.value))
        assert not (idx_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
        assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".tmp"))]


@pytest.mark.parametrize("damage, reason", [(truncate, r"UnpicklingError: pickle data was truncated"),
                                            (garble, r"UnpicklingError: invalid load key, '\\x00'\.")])
def test_damaged_cifar_batch_is_named(cfg, cifar_root, tmp_path, damage, reason):
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    damage(batch)
    use_dataset(cfg, "cifar10", root=str(cifar_root), verify=False)
    with pytest.raises(UserError) as raised:
        build_splits(cfg.dataset, tmp_path)
    assert re.fullmatch(rf"cannot read {re.escape(str(batch))} \({reason}\): replace it with a complete copy \(or "
                        r"delete it and set dataset\.download=true\)", str(raised.value))
