"""The five stages as plain functions, wired in order: train -> calibrate -> convert -> simulate -> report.
Training and calibration results are cached (sha256 + config key), so sweeps over methods or T share them
and an interrupted run resumes from the last completed stage."""

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from snnbench import api
from snnbench.app.console import show_run
from snnbench.app.devices import resolve_device, simulation_engine
from snnbench.app.exporters import RunProducts, build_exporters
from snnbench.app.models import build_model
from snnbench.app.shards import check_shard
from snnbench.app.train import evaluate, init_checkpoint_sha256, progress_bar, start_of_training, train, with_activation
from snnbench.app.validate import check_values
from snnbench.conversion import methods, saved
from snnbench.core.calibrate import Calibration
from snnbench.core.convertible import check_convertible
from snnbench.core.graph import spiking_layer_names, trace, with_average_pooling
from snnbench.errors import UserError
from snnbench.io.cache import cached, code_version, config_hash, data_bytes, load_data, sha256_of
from snnbench.io.checkpoints import load_checkpoint
from snnbench.io.data import DataSplits, build_splits, identity, loader, seeded_subset, shard_of
from snnbench.io.files import write_csv, write_json
from snnbench.simulation.backend import reuse_freed_memory

log = logging.getLogger("snnbench")


def validate(cfg: DictConfig) -> methods.Method:
    """Reject impossible values before any work starts, naming the key and the fix; return the run's method
    (method_of)."""
    check_values(cfg)
    check_shard(cfg.sim.shard, cfg.sim.num_shards)
    if OmegaConf.is_missing(cfg.model, "_target_"):
        raise UserError("model=custom needs the class or factory to build: add model._target_=<module>.<Class> "
                        "(importable from the working directory or PYTHONPATH; docs/models.md)")
    method = method_of(cfg)
    methods.check_nonlinear(method, cfg.convert.nonlinear)
    return method


def method_of(cfg: DictConfig) -> methods.Method:
    """cfg.method as its typed object, its knobs checked (a run's interpolations, such as T: ${sim.T}, resolved).
    An experiment preset may set knobs of one of the methods it sweeps (ttrbr_resnet110_*: TTRBR's tuning), which
    the others do not have: a key the chosen class lacks is left to them. Only a config file can add such a key
    (the command line refuses a key the composed config lacks), and tests/app/test_configs.py checks that each is a
    knob of a method."""
    config = _container(cfg.method)
    knobs = {field.name for field in fields(methods.method_class_of(config.get("_target_")))}
    return methods.build_method({key: value for key, value in config.items() if key in knobs or key == "_target_"})


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# The code that produces each kind of cache entry (paths in the snnbench package): its hash is part of the
# entry's key (io.cache.code_version), so that an upgrade that changes it rebuilds the entry.
ANN_CODE = ("app/train.py", "app/models.py", "models", "core", "io/data.py", "io/checkpoints.py")
CALIBRATION_CODE = ("core", "models")
CONVERSION_CODE = ("conversion", "core", "models", "simulation/simulate.py")


def prepare_ann(cfg, model, splits, device):
    """Stage 1: load `train.checkpoint` into `model`, or train it (once per recipe, cached). Returns (model, path,
    sha256)."""
    if cfg.train.checkpoint:
        path = Path(cfg.train.checkpoint)
        log.info("loading ANN weights from %s (training skipped)", path)
        return load_checkpoint(with_activation(model, cfg.train), path).eval(), str(path), sha256_of(path)
    dataset = identity(cfg.dataset)  # the data trained on, as well as the dataset's settings
    # unset options (None) stay out of the key, so a knob added later keeps existing cache entries valid
    train_cfg = {k: v for k, v in _container(cfg.train).items()
                 if k not in ("checkpoint", "num_workers") and v is not None}
    if "init_checkpoint" in train_cfg:  # what a fine-tune starts from, by its content
        train_cfg["init_checkpoint"] = init_checkpoint_sha256(train_cfg["init_checkpoint"])
    key = config_hash(dataset, _container(cfg.model), architecture(model), train_cfg, cfg.seed,
                      code_version(*ANN_CODE))
    path = Path(cfg.cache_dir) / "ann" / f"{cfg.dataset.name}_{cfg.model.name}_{key}.pt"
    progress = path.with_suffix(".progress.pt")  # per-epoch state: an interrupted training resumes from it

    def build():
        log.info("training ANN %s on %s for %d epochs (cache entry %s)", cfg.model.name, cfg.dataset.name,
                 cfg.train.epochs, path.name)
        torch.manual_seed(cfg.seed)
        # reshuffled every epoch, unlike loader's `limit`, which fixes one order
        train_set = seeded_subset(splits.train, cfg.train.num_samples, cfg.seed)
        train_batches = loader(train_set, cfg.train.batch_size, shuffle=True, seed=cfg.seed,
                               num_workers=cfg.train.num_workers)
        test_batches = loader(splits.test, 256, num_workers=cfg.train.num_workers)
        start = start_of_training(model, cfg.train, train_batches, device)
        return train(start, train_batches, test_batches, cfg.train, device, progress)

    def load(p):
        return load_checkpoint(with_activation(build_ann(cfg), cfg.train), p)

    ann, digest, was_cached = cached(path, key, build, lambda trained: data_bytes(trained.state_dict()), load)
    if was_cached:
        log.info("using cached ANN %s (trained once, shared by every run with this recipe)", path)
    else:
        progress.unlink(missing_ok=True)  # only now: the finished ANN is safely in the cache
    return ann.eval(), str(path), digest


def architecture(model) -> str:
    """What the model computes besides its weights: its traced code, which calls what, its modules with their
    settings and parameter shapes (the repr), and the buffers no checkpoint holds (the input normalisation's mean
    and std), so that another class or normalisation for the same weights, or a max pooling become average
    pooling, changes the cache key."""
    persistent = model.state_dict()
    unsaved = [f"{name} {list(buffer.shape)} {buffer.flatten().tolist()}"
               for name, buffer in model.named_buffers() if name not in persistent]
    return "\n".join([trace(model).code, repr(model), *unsaved])


def calibration_images(cfg, splits):
    batches = loader(splits.calibration, cfg.calibrate.batch_size, shuffle=True, seed=cfg.seed,
                     limit=_num_calibration_images(cfg))
    return [images for images, _ in batches]


def _num_calibration_images(cfg) -> int:
    return cfg.calibrate.batch_size * cfg.calibrate.num_batches


def evaluated_images(cfg, splits):
    """The images the SNN is scored on: the test split, or with split=train (to choose knobs without looking at
    the test set) the training images, unaugmented, that `calibration_images` did not draw: the calibration and
    the tuning never saw them, so a knob that fits those images cannot look better than it is. Of those, a seeded
    random `sim.num_samples`, and of these the part `sim.shard` of `sim.num_shards`."""
    if cfg.sim.split == "test":
        scored = splits.test
    else:
        scored = seeded_subset(splits.calibration, None, cfg.seed, skip=_num_calibration_images(cfg))
        if len(scored) == 0:
            raise UserError(f"sim.split=train evaluates the training images the calibration does not use, and it "
                            f"uses all {len(splits.calibration)}: lower calibrate.num_batches or calibrate.batch_size")
    return shard_of(seeded_subset(scored, cfg.sim.num_samples, cfg.seed), cfg.sim.shard, cfg.sim.num_shards, cfg.seed)


def calibrate_stage(cfg, ann, ann_sha, images, device) -> tuple[Calibration, str]:
    """Stage 2: percentile thresholds of every ReLU, cached per (ANN, calibration setting). Returns the calibration
    and its cache entry's sha256."""
    key = config_hash(ann_sha, architecture(ann), identity(cfg.dataset), _container(cfg.calibrate),
                      cfg.convert.maxpool, cfg.seed, code_version(*CALIBRATION_CODE))
    path = Path(cfg.cache_dir) / "calibration" / f"{key}.pt"

    def build():
        log.info("calibrating %d images (percentile %s, %s)", sum(len(i) for i in images),
                 cfg.calibrate.percentile, "per channel" if cfg.calibrate.per_channel else "per layer")
        return api.calibrate(ann, images, percentile=cfg.calibrate.percentile, per_channel=cfg.calibrate.per_channel,
                             rule=cfg.calibrate.rule, device=device, seed=cfg.seed)

    def save(calibration):
        return data_bytes(saved.calibration_as_data(calibration))

    def load(p):
        return saved.calibration_from(load_data(p), spiking_layer_names(ann))

    calibration, digest, was_cached = cached(path, key, build, save, load)
    if was_cached:
        log.info("using cached calibration %s", path.name)
    return calibration, digest


@dataclass
class Prepared:
    """Everything before the simulation, the same for `run`, `bench` and `inspect`."""
    splits: DataSplits
    evaluated: Dataset              # the images the SNN is scored on (evaluated_images)
    ann: nn.Module                  # the canonical ANN (canonicalize), on the run's device
    checkpoint: str
    checkpoint_sha: str
    calibration_images: list        # training-split batches: the calibration's and the method's
    calibration: Calibration        # of `ann`
    method: methods.Method          # cfg.method, built and checked
    conversion: methods.Conversion  # the method's result
    times: dict[str, float]         # seconds of each stage
    cache_entries: dict[str, str]   # sha256 of each cache entry used: ann (unless train.checkpoint), calibration, ...


def build_ann(cfg: DictConfig) -> nn.Module:
    """cfg.model for cfg.dataset, as it is trained or loaded: with convert.maxpool=avg its max pooling is average
    pooling already, so that the ANN snnbench trains and scores is the network it converts."""
    model = build_model(cfg.model, cfg.dataset)
    return with_average_pooling(model) if cfg.convert.maxpool == "avg" else model


def canonical_ann(cfg: DictConfig, model: nn.Module) -> nn.Module:
    """The canonical network of `model` (cfg's, trained or loaded) that calibration, conversion and simulation
    read; with the untrained model, what a canonical ANN's state_dict loads into (bench's engine processes)."""
    return api.canonical(model.cpu(), maxpool=cfg.convert.maxpool, nonlinear=cfg.convert.nonlinear)


def prepare(cfg: DictConfig, device: str) -> Prepared:
    """Check the config and the model (before any data is read or weights trained), then load the data, train or
    load the ANN, calibrate it and convert it with cfg.method."""
    method = validate(cfg)
    model = build_ann(cfg)
    check_convertible(with_activation(model, cfg.train), cfg.dataset.channels, cfg.dataset.image_size,
                      cfg.dataset.num_classes, cfg.convert.maxpool, cfg.convert.nonlinear)  # before training
    times, clock = {}, time.perf_counter()
    splits = build_splits(cfg.dataset, cfg.cache_dir)
    evaluated = evaluated_images(cfg, splits)
    trained, checkpoint, checkpoint_sha = prepare_ann(cfg, model, splits, device)
    ann = canonical_ann(cfg, trained).to(device)  # the later stages run on the device
    times["time_train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    images = calibration_images(cfg, splits)
    calibration, calibration_sha = calibrate_stage(cfg, ann, checkpoint_sha, images, device)
    times["time_calibrate_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    conversion, conversion_sha = convert_stage(cfg, method, ann, calibration, checkpoint_sha, images)
    times["time_convert_s"] = time.perf_counter() - clock
    entries = {**({} if cfg.train.checkpoint else {"ann": checkpoint_sha}), "calibration": calibration_sha,
               "conversion": conversion_sha}
    return Prepared(splits, evaluated, ann, checkpoint, checkpoint_sha, images, calibration, method, conversion,
                    times, entries)


def convert_stage(cfg, method, ann, calibration, ann_sha, images) -> tuple[methods.Conversion, str]:
    """Stage 3: `method`'s conversion, cached per (ANN, calibration data and setting, method knobs, T), so that
    the shards of one evaluation and reruns share TTRBR's tuning. Saved as data (conversion.saved), rebuilt from
    the canonical `ann`. Returns the conversion and its cache entry's sha256."""
    key = conversion_key(cfg, ann, ann_sha)
    path = Path(cfg.cache_dir) / "conversion" / f"{cfg.method.name}_{key}.pt"

    def build():
        log.info("converting with %s", cfg.method.name)
        return api.convert_canonical(ann, method, calibration, images, T=cfg.sim.T,
                                     percentile=cfg.calibrate.percentile, seed=cfg.seed)

    def save(conversion):
        return data_bytes(saved.as_data(conversion))

    def load(p):
        return saved.rebuilt(load_data(p), ann)

    conversion, digest, was_cached = cached(path, key, build, save, load)
    if was_cached:
        log.info("using cached conversion %s", path.name)
    return conversion, digest


def conversion_key(cfg, ann, ann_sha) -> str:
    """Everything a conversion depends on: the ANN (weights, code and normalisation), the data, the calibration,
    convert and method settings, T, the seed and the code that converts."""
    return config_hash(ann_sha, architecture(ann), identity(cfg.dataset), _container(cfg.calibrate),
                       _container(cfg.convert), _container(cfg.method), cfg.sim.T, cfg.seed,
                       code_version(*CONVERSION_CODE))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    reuse_freed_memory()
    device = resolve_device(cfg.device)
    engine = simulation_engine(cfg.engine, device)  # an engine that cannot run here stops the run before any work
    exporters = build_exporters(cfg)  # a bad exporter stops the run before any work
    torch.manual_seed(cfg.seed)
    prepared = prepare(cfg, device)
    ann, conversion, times = prepared.ann, prepared.conversion, prepared.times
    eval_batches = loader(prepared.evaluated, cfg.sim.batch_size)
    clock = time.perf_counter()
    ann_accuracy = evaluate(ann, eval_batches, device)
    times["time_evaluate_ann_s"] = time.perf_counter() - clock
    log.info("ANN accuracy %.2f %% on %d %s images%s", 100 * ann_accuracy, len(eval_batches.dataset), cfg.sim.split,
             f" (shard {cfg.sim.shard} of {cfg.sim.num_shards})" if cfg.sim.num_shards > 1 else "")
    converted = api.converted_of(conversion, ann, prepared.method, prepared.calibration_images[0], T=cfg.sim.T,
                                 model=cfg.model.name)

    clock = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("simulating", total=len(eval_batches.dataset), status=f"T={cfg.sim.T}")
        result = api.simulate(converted, eval_batches, coding=cfg.sim.coding, engine=engine, device=device,
                              seed=cfg.seed, batch_size=cfg.sim.batch_size, sub_batch=cfg.sim.sub_batch,
                              chunk=cfg.sim.chunk, channels_last=cfg.sim.channels_last,
                              max_memory_mb=cfg.sim.max_memory_mb,
                              mac_pj=cfg.energy.mac_pj, ac_pj=cfg.energy.ac_pj, dataset=cfg.dataset.name,
                              ann_accuracy=ann_accuracy, progress=lambda k: bar.update(task, advance=k))
    times["time_simulate_s"] = time.perf_counter() - clock

    accuracy, layers, counts = result.accuracy, result.layers, result.counts  # counts: what `report` merges
    summary = {
        **result.summary, "shard": cfg.sim.shard, "num_shards": cfg.sim.num_shards, "split": cfg.sim.split,
        **{k: round(v, 3) for k, v in times.items()},
        "checkpoint": prepared.checkpoint, "checkpoint_sha256": prepared.checkpoint_sha,
        "cache_entries": prepared.cache_entries,
    }
    # summary.json, written last, marks a complete run: no CSV may outlive a failed or interrupted write
    (run_dir / "summary.json").unlink(missing_ok=True)
    try:
        write_csv(run_dir / "accuracy.csv", accuracy)
        write_csv(run_dir / "layers.csv", layers)
        write_json(run_dir / "counts.json", counts)
        products = RunProducts(run_dir, cfg, converted, accuracy, layers, counts, summary)
        for export in exporters:  # each writes its own files (export=[...], conf/export/)
            export(products)
        write_json(run_dir / "summary.json", summary)
    except BaseException:
        for name in ("accuracy.csv", "layers.csv", "counts.json"):
            (run_dir / name).unlink(missing_ok=True)
        raise
    show_run(summary, accuracy)
    return summary
