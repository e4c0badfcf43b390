"""What every command's options dataclass shares: the field helper (default, help, click type,
choices) and the decorator that lets a public function take ``options=`` or the fields as keywords.

This module does not import TensorFlow (the CLI reads the fields before any command runs).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import field
from typing import Any, Callable, Sequence


def option(default: Any, help: str, *, type: Any = None, choices: Sequence[str] | None = None,
           records: bool = False, flag: bool = False, negatable: bool = False, cli: bool = True,
           shown: Any = None, convert: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with what the CLI needs to build its flag: ``help``, click ``type`` /
    ``choices``, ``flag`` for an on/off switch (``negatable``: ``--x/--no-x``, default shown);
    ``cli=False``: Python and config only (no flag); ``shown``: the default as the help shows it,
    when it differs from the value (``none`` for None); ``convert``: the flag's value converted
    (a click callback). ``records``: the value changes the
    embeddings (part of cache keys)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "records": records,
                                            "flag": flag, "negatable": negatable, "cli": cli, "shown": shown,
                                            "convert": convert})


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def cli_fields(cls: type, names: Sequence[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag, in declaration order (only ``names`` if given)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and (names is None or f.name in names)]


def takes_options(cls: type, *, exclude: Sequence[str] = (), only: Sequence[str] | None = None,
                  param: str = "options") -> Callable[[Callable], Callable]:
    """Let a public function take ``options=cls(...)`` and/or the fields of ``cls`` as keywords.

    The decorated function is called with ``options`` (or ``param``) resolved: the given dataclass
    (or the defaults) with the keyword fields applied, validated once. ``exclude`` / ``only``:
    fields the function does not use / the only ones it uses (passing another one as a keyword is
    an error, as is any unknown keyword). Two dataclasses stack (the inner one under another
    ``param``). The accepted field names are kept as ``func.option_fields``, the classes and their
    parameters as ``func.options_classes`` / ``func.options_params``, for :func:`dfl_tf.config.merge`.
    """
    names = field_names(cls)

    def decorate(func: Callable) -> Callable:
        own = set(inspect.signature(func).parameters)
        unknown = (set(exclude) | set(only or ())) - set(names)
        if unknown:
            raise TypeError(f"{func.__name__}: {sorted(unknown)} are not {cls.__name__} fields")
        accepted = tuple(name for name in names if name not in exclude and (only is None or name in only))
        clash = own & set(accepted)
        if clash:  # a field must not also be a parameter of the function
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} shadow {cls.__name__} fields")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            options = kwargs.pop(param, None)
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
            unknown = [k for k in kwargs if k not in own]
            if unknown:
                raise TypeError(f"{func.__name__}() got an unexpected keyword argument '{unknown[0]}'")
            if options is None:
                options = cls(**fields)
            elif not isinstance(options, cls):
                article = "an" if cls.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{func.__name__}(): {param} must be {article} {cls.__name__}, "
                                f"not {type(options).__name__}")
            elif fields:
                options = dataclasses.replace(options, **fields)
            return func(*args, **{param: options}, **kwargs)

        wrapper.option_fields = accepted  # type: ignore[attr-defined]
        wrapper.options_classes = (cls, *getattr(func, "options_classes", ()))  # type: ignore[attr-defined]
        wrapper.options_params = (param, *getattr(func, "options_params", ()))  # type: ignore[attr-defined]
        # help() and IDEs show the accepted fields as keyword-only parameters, with their defaults
        signature = inspect.signature(func)
        extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                 for f in dataclasses.fields(cls) if f.name in accepted]
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*signature.parameters.values(), *extra])
        return wrapper

    return decorate
