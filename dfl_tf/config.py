"""YAML configs and CLI overrides, validated once at the boundary.

A config file is a mapping of a command's parameters (the keyword arguments of its public
function, e.g. :func:`dfl_tf.extract`, including the :class:`~dfl_tf.options.ExtractOptions`
fields it takes), either at the top level or under a section named
after the command (``extract:``, ``train:``...). Precedence: function defaults < file < flags
given on the command line.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import yaml

from dfl_tf.errors import DflError

SECTIONS = ("extract", "train", "evaluate", "export", "predict", "select", "finetune", "tile", "heatmap", "demo")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DflError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DflError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise DflError(f"{path}: a config must be a mapping of parameters")
    return data


def section(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The parameters for command ``name``: its section if present, else top-level keys."""
    if name in data and isinstance(data[name], dict):
        return dict(data[name])
    return {k: v for k, v in data.items() if k not in SECTIONS}


def known_fields(func: Callable) -> list[str]:
    """The keyword arguments a config may set for ``func``: its own parameters and, for a
    function that takes extraction options, the :class:`~dfl_tf.options.ExtractOptions` fields
    it accepts (``func.option_fields``)."""
    params = [name for name, p in inspect.signature(func).parameters.items()
              if name not in ("options", "model") and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return params + [name for name in getattr(func, "option_fields", ()) if name not in params]


def merge(func: Callable, config_path: str | Path | None, command: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``func``: config file values overridden by ``given`` (CLI flags set)."""
    known = known_fields(func)
    values: dict[str, Any] = {}
    if config_path:
        for key, value in section(load_yaml(config_path), command).items():
            name = key.replace("-", "_")
            if name not in known:
                raise DflError(f"{config_path}: unknown field '{key}' for '{command}' (known: {', '.join(known)})")
            values[name] = value
    values.update(given)
    return values
