import pytest
import torch

from snnbench import data
from snnbench.data import build_splits, seeded_subset
from snnbench.errors import UserError


def test_digits_split_is_fixed_and_stratified(cfg):
    first, second = build_splits(cfg.dataset), build_splits(cfg.dataset)
    assert len(first.train) + len(first.test) == 1797
    assert torch.equal(first.test.tensors[0], second.test.tensors[0])
    counts = torch.bincount(first.test.tensors[1])
    assert counts.min() >= 40 and counts.max() <= 50
    assert 0 <= first.train.tensors[0].min() and first.train.tensors[0].max() <= 1


def test_mnist_reads_gz_idx_files_from_a_read_only_folder(cfg, idx_root, tmp_path, monkeypatch):
    cfg.dataset = {**cfg.dataset, "name": "mnist", "root": str(idx_root), "image_size": 28}
    monkeypatch.setattr(data, "_writable", lambda folder: False)  # root ignores chmod: simulate read-only
    splits = build_splits(cfg.dataset, tmp_path / "cache")
    assert len(splits.train) == 40 and len(splits.test) == 20
    image, label = splits.test[3]
    assert image.shape == (1, 28, 28) and label == 3
    assert (tmp_path / "cache" / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


def test_cifar10_repacked_copy_needs_verify_false(cfg, cifar_root, tmp_path):
    cfg.dataset = {**cfg.dataset, "name": "cifar10", "root": str(cifar_root), "channels": 3, "image_size": 32,
                   "augment": True, "verify": True}
    with pytest.raises(UserError, match="dataset.verify=false"):
        build_splits(cfg.dataset, tmp_path)
    cfg.dataset.verify = False
    splits = build_splits(cfg.dataset, tmp_path)
    assert len(splits.train) == 40 and len(splits.test) == 8
    image, label = splits.calibration[5]
    assert image.shape == (3, 32, 32) and label == 5


def test_missing_files_say_where_and_how(cfg, tmp_path):
    cfg.dataset = {**cfg.dataset, "name": "fashion_mnist", "root": str(tmp_path / "nowhere")}
    with pytest.raises(UserError, match=r"FashionMNIST/raw/.*dataset.root="):
        build_splits(cfg.dataset, tmp_path)


def test_train_num_samples_trains_on_a_seeded_subset_and_keys_the_cache(cfg, monkeypatch):
    from snnbench import pipeline

    seen = []

    def fake_train(model, train_batches, test_batches, train_cfg, device, progress):
        images = train_batches.dataset
        seen.append(sorted(images.indices) if hasattr(images, "indices") else list(range(len(images))))
        return model

    monkeypatch.setattr(pipeline, "train", fake_train)
    splits = build_splits(cfg.dataset)
    cfg.train.num_samples = 100
    _, first, _ = pipeline.prepare_ann(cfg, splits, "cpu")
    pipeline.Path(first).unlink()
    pipeline.prepare_ann(cfg, splits, "cpu")
    cfg.train.num_samples = None
    _, full, _ = pipeline.prepare_ann(cfg, splits, "cpu")
    assert len(seen[0]) == 100 and seen[0] == seen[1]  # the same images every time
    assert len(set(seen[0])) == 100 and max(seen[0]) < len(splits.train)
    assert len(seen[2]) == len(splits.train)
    assert first != full  # a subset is another recipe: its own cache entry


def test_sim_split_train_evaluates_training_images(cfg, tmp_path):
    from snnbench import pipeline

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
    from snnbench import pipeline

    cfg.sim.split = "train"
    splits = build_splits(cfg.dataset)
    calibrated = {image.numpy().tobytes() for batch in pipeline.calibration_images(cfg, splits) for image in batch}
    evaluated = pipeline.evaluated_images(cfg, splits)
    assert len(calibrated) == cfg.calibrate.batch_size * cfg.calibrate.num_batches  # distinct images
    assert not any(image.numpy().tobytes() in calibrated for image, _ in evaluated)


def test_sim_split_train_refuses_when_the_calibration_uses_every_training_image(cfg, tmp_path):
    from snnbench import pipeline

    cfg.sim.split, cfg.calibrate.num_batches = "train", 100
    with pytest.raises(UserError, match="lower calibrate.num_batches"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # refused before any work
