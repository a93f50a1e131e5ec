"""Where the configs are: their copy inside an installed package (pyproject.toml maps conf/ to snnbench/conf/),
else a source tree's conf/. The command line composes runs from there, and the Python API reads a method's YAML
from there by name. And the class a config's `_target_` names, for the groups whose classes snnbench builds
itself (datasets, methods, engines)."""

import importlib
import types
import typing
from pathlib import Path

from snnbench.errors import UserError, first_line

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # snnbench/
CONF_DIR = PACKAGE_DIR / "conf" if (PACKAGE_DIR / "conf").is_dir() else PACKAGE_DIR.parent / "conf"


def class_named(target: object, key: str, base: type | types.UnionType, example: str) -> type:
    """The class that `target` (the dotted path a config's `key._target_` holds) names, a subclass of `base`;
    anything else is a UserError that says what to name instead."""
    expected = " or ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in typing.get_args(base) or (base,))
    if not isinstance(target, str) or "." not in target:
        raise UserError(f"{key}._target_ must name a class (e.g. {example}), got {target!r}")
    module_name, _, class_name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module may fail to import in any way
        raise UserError(f"{key}._target_={target}: cannot import {module_name} ({type(err).__name__}: "
                        f"{first_line(err)}): it must be importable from the working directory or PYTHONPATH") from None
    found = vars(module).get(class_name)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise UserError(f"{key}._target_={target} names no subclass of {expected} in {module_name}: name one "
                        f"(e.g. {example})")
    return found
