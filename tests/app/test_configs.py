"""Every option of every config group, and every experiment preset, composes in struct mode (no key a config
sets is missing from the tree, no typo in a preset's keys) and passes the checks a run makes before any work."""

from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR, options
from snnbench.methods import named

GROUPS = [path.name for path in sorted(CONF_DIR.iterdir()) if path.is_dir() and path.name != "hydra"]
# options that need a key only the user can give: what the run is refused without
NEEDS_USER_INPUT = {("model", "custom"): "model=custom needs the class or factory to build",
                    ("method", "qcfs"): "method=qcfs converts an ANN trained with QCFS activations",
                    ("method", "spikezip"): "method=spikezip converts the quantised ANN of SpikeZIP-TF",
                    ("method", "ecmt"): "method=ecmt computes the nonlinear operations as analog operators"}


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose(config_name="config", overrides=overrides)
    assert OmegaConf.is_struct(config)
    return config


def every_option():
    return [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    assert {"dataset", "model", "method", "train", "calibrate", "sim", "experiment"} <= set(GROUPS)
    assert all(options(group) for group in GROUPS)


@pytest.mark.parametrize("group, option", every_option(), ids=lambda value: str(value))
def test_every_option_composes_and_validates(group, option, tmp_path):
    config = composed([f"{group}={option}", f"cache_dir={tmp_path}"])
    OmegaConf.resolve(config)  # every interpolation resolves
    if (group, option) in NEEDS_USER_INPUT:
        from snnbench.errors import UserError

        with pytest.raises(UserError, match=NEEDS_USER_INPUT[group, option]):
            pipeline.validate(config)
    else:
        pipeline.validate(config)


def test_struct_mode_refuses_a_key_the_tree_lacks(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="sim.TT"):
        composed(["sim.TT=4", f"cache_dir={tmp_path}"])


# what only a run gives: the method options whose YAML takes a value from another group
RUN_GIVES = {"qcfs": ["train.activation=qcfs"], "spikezip": ["train.activation=spikezip"]}


@pytest.mark.parametrize("name", options("method"))
def test_every_method_yaml_instantiates_its_class_whose_defaults_are_the_yamls(name, tmp_path):
    """conf/method/<name>.yaml builds its `_target_` class under its own name, with every knob the class has, in
    the class's order; a method's own YAML (not a preset, which sets knobs over another's) holds the class's
    defaults, so that the knobs in code and in conf/ cannot drift apart. A value interpolated from the run
    (T: ${sim.T}) is the run's: the class's default means the same (None: the run's T)."""
    config = composed([f"method={name}", *RUN_GIVES.get(name, []), f"cache_dir={tmp_path}"])
    yaml = OmegaConf.to_container(config.method, resolve=False)
    method = pipeline.method_of(config)
    method_class = type(method)
    assert f"{method_class.__module__}.{method_class.__qualname__}" == yaml.pop("_target_")
    assert method.name == yaml["name"] == name
    assert list(yaml) == [knob.name for knob in fields(method_class)]
    preset = "defaults" in OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
    defaults = method_class()
    for knob, value in yaml.items():
        if isinstance(value, str) and value.startswith("${"):
            continue
        value = tuple(value) if isinstance(value, list) else value
        assert getattr(method, knob) == value, knob
        if not preset and knob != "name":
            assert getattr(defaults, knob) == value, knob
    assert preset == (name != defaults.name)  # a preset is a class under another name


@pytest.mark.parametrize("name", options("experiment"))
def test_every_method_knob_an_experiment_sets_is_a_knob_of_a_method_it_sweeps(name):
    """A run leaves out the knobs its method lacks (pipeline.method_of), so that an experiment can tune one of the
    methods it sweeps; this keeps a misspelt knob there from passing unseen."""
    preset = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml")
    knobs = [key for key in preset.get("method", {}) if key != "_target_"]
    swept = str(OmegaConf.select(preset, "hydra.sweeper.params.method", default="")).split(",")
    classes = {type(named(method.strip())) for method in swept if method.strip()}
    for knob in knobs:
        assert any(knob in {field.name for field in fields(method_class)} for method_class in classes), knob
