"""YAML configs and CLI overrides, validated once at the boundary.

A config file is a mapping of a command's parameters (the keyword arguments of its public
function, e.g. :func:`dfl_tf.extract`, including the fields of the options dataclass it takes,
:class:`~dfl_tf.options.ExtractOptions`, :class:`~dfl_tf.options.TrainOptions`...), either at the top level or under a section named
after the command (``extract:``, ``train:``...). Precedence: function defaults < file < flags
given on the command line.

Each value is checked against the type of the parameter it sets (the function's annotation): a
whole number where an int is taken (``2.7`` and ``true`` are refused, not rounded or counted as 1),
a number for a float, ``true``/``false`` for a switch, a string or a list of strings for a list of
names. A string is also accepted where the command's flag takes one, converted by the flag's own
type (``lr: 1e-3``, ``mpp: 20x``). A mismatch is a one-line error naming the file and the key, as
are a key given twice in one mapping and a command section that is not a mapping.
"""
from __future__ import annotations

import collections.abc
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from dfl_tf.errors import DflError

SECTIONS = ("extract", "train", "evaluate", "export", "predict", "select", "finetune", "tile", "heatmap", "demo")


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DflError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise DflError(f"{path}: key '{exc.args[0]}' appears twice in one mapping (line {exc.args[1]}); "
                       "YAML would keep the last one silently") from None
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
    function that takes an options dataclass (:mod:`dfl_tf.options`), the fields it accepts
    (``func.option_fields``)."""
    skip = ("options", "model", *getattr(func, "options_params", ()))  # the dataclasses themselves
    params = [name for name, p in inspect.signature(func).parameters.items()
              if name not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return params + [name for name in getattr(func, "option_fields", ()) if name not in params]


def merge(func: Callable, config_path: str | Path | None, command: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``func``: config file values overridden by ``given`` (CLI flags set)."""
    known = known_fields(func)
    values: dict[str, Any] = {}
    if config_path:
        data = load_yaml(config_path)
        if data.get(command) is not None and not isinstance(data[command], dict):
            raise DflError(f"{config_path}: section '{command}' must be a mapping of parameters "
                           f"(got {type(data[command]).__name__})")
        hints = _hints(func)  # resolved once per config, not per key
        for key, value in section(data, command).items():
            name = key.replace("-", "_")
            if name not in known:
                raise DflError(f"{config_path}: unknown field '{key}' for '{command}' (known: {', '.join(known)})")
            values[name] = _checked(hints.get(name), value, f"{config_path}: '{key}'")
    values.update(given)
    return values


def _hints(func: Callable) -> dict[str, Any]:
    """Type hints of ``func``'s parameters and of the options fields it takes (``func.options_classes``)."""
    hints: dict[str, Any] = {}
    for cls in reversed(getattr(func, "options_classes", ())):
        hints.update(typing.get_type_hints(cls))
    try:
        hints.update(typing.get_type_hints(inspect.unwrap(func)))
    except Exception:  # noqa: BLE001 - an unresolvable hint: no check rather than no config
        pass
    return hints


_SEQUENCES = (tuple, list, collections.abc.Sequence)  # typing.get_origin of Sequence[str] etc.
_MAPPINGS = (dict, collections.abc.Mapping)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value is of the type ``hint`` (strict: a bool is no number, a float no int)."""
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike):
        return isinstance(value, str)
    args = typing.get_args(hint)
    if origin in _SEQUENCES or hint in (tuple, list):
        item = args[0] if args else Any
        if isinstance(value, str):  # a comma-separated list, as on the command line
            return item in (str, Any)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin in _MAPPINGS or hint is dict:
        return isinstance(value, dict)
    return True  # a class or callable a YAML file cannot hold: the function checks it


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             type(None): "empty (null)", Path: "a path"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(h) for h in typing.get_args(hint)))
    if typing.get_origin(hint) in _SEQUENCES:
        item = (typing.get_args(hint) or (Any,))[0]
        return "a list or a comma-separated string" if item in (str, Any) else "a list"
    if typing.get_origin(hint) in _MAPPINGS:
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _from_string(value: str, hint: Any) -> Any:
    """A quoted number converted as its flag would convert it (``epochs: "3"`` -> 3), else ``None``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in (int, float):
        if kind in options:
            try:
                return kind(value.strip())
            except ValueError:
                continue
    return None


def _checked(hint: Any, value: Any, where: str) -> Any:
    """``value`` if it fits the parameter's type ``hint`` (or, a quoted number, converted to it)."""
    if hint is None or _fits(value, hint):
        return value
    converted = _from_string(value, hint) if isinstance(value, str) else None
    if converted is not None:
        return converted
    raise DflError(f"{where} must be {_describe(hint)} (got {value!r})")
