"""Every option of every config group, and every experiment preset, composes in struct mode (no key a config
sets is missing from the tree, no typo in a preset's keys) and passes the checks a run makes before any work."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR, options

GROUPS = [path.name for path in sorted(CONF_DIR.iterdir()) if path.is_dir() and path.name != "hydra"]
# options that need a key only the user can give: what the run is refused without
NEEDS_USER_INPUT = {("model", "custom"): "model=custom needs the class or factory to build",
                    ("method", "qcfs"): "method=qcfs converts an ANN trained with QCFS activations",
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
