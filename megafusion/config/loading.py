"""Load a Config from a YAML preset plus dotlist overrides, type-checked by omegaconf structured configs.

    cfg = load_config("configs/tiny.yaml", ["model.num_layers=4", "training.train_steps=10"])

Presets may name another preset with a top-level `defaults: other.yaml` (a path relative to the file), merged
first. An unknown key or a value of the wrong type is a ValueError naming the key (a file that is not YAML, or
whose top level is not a mapping, one naming the file); semantic checks run in the
dataclasses' __post_init__ when the merged tree is turned back into objects.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megafusion.config.schema import Config

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_preset(name_or_path: str) -> str:
    """A path to a YAML file, or the name of a preset in configs/ (`tiny` -> configs/tiny.yaml)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(PRESET_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(candidate):
        return candidate
    presets = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml")) if os.path.isdir(PRESET_DIR) else []
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset; presets: {presets}")


def _read_yaml(path: str, seen=()) -> DictConfig:
    if path in seen:
        raise ValueError(f"{path}: circular `defaults` chain {list(seen) + [path]}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, DictConfig):
        raise ValueError(f"{path}: the top level must be a mapping of sections (model:, data:, training:, ...), "
                         f"found a {type(raw).__name__.replace('Config', '').lower()}")
    base = raw.pop("defaults", None)
    if base is None:
        return raw
    parent = _read_yaml(os.path.join(os.path.dirname(path), str(base)), seen + (path,))
    return OmegaConf.merge(parent, raw)


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    schema = OmegaConf.structured(Config)
    where = "defaults"
    try:
        merged = schema
        if path is not None:
            where = resolve_preset(path)
            merged = OmegaConf.merge(merged, _read_yaml(where))
        overrides = list(overrides)
        if overrides:
            where = "command-line overrides"
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"override {bad[0]!r} is not of the form section.key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        reason = str(getattr(e, "msg", e)).splitlines()[0]
        raise ValueError(f"{where}: invalid config key {key!r}: {reason}") from None


def to_yaml(cfg: Union[Config, DictConfig]) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)
