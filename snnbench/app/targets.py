"""What a config node names by `_target_` (a model, an exporter), built with hydra.utils.instantiate."""

from snnbench.errors import UserError


def instantiated(node, key: str, own_keys: tuple[str, ...] = (), keys_added_by_plus: bool = False):
    """What `node._target_` builds from the node's keys other than `own_keys` (those snnbench reads itself); a
    target that cannot be imported or built is a UserError naming `key` (e.g. model) and the cause; with
    `keys_added_by_plus`, the command line may add keys to the node (`+model.width=32`, validate.check_overrides)."""
    import hydra.utils
    from omegaconf import OmegaConf

    arguments = OmegaConf.create({k: v for k, v in node.items() if k not in own_keys})
    target = node._target_
    try:
        return hydra.utils.instantiate(arguments, _convert_="all")
    except Exception as err:  # hydra wraps the import or constructor failure; its last line is the cause
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise UserError(f"cannot build {key}._target_={target} ({type(cause).__name__}: {reason}): the target must "
                        "be importable (from the working directory or PYTHONPATH) and accept the keys given"
                        + (f" (add new ones with +{key}.<key>=...)" if keys_added_by_plus else "")) from err
