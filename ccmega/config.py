"""Typed run configs: nested dataclasses, filled from defaults, then a YAML file, then overrides.

Every command that trains (`ccmega pretrain`, `ccmega icae-train`) describes its config as nested
dataclasses and calls `parse_config`:

    ccmega pretrain --config examples/pretrain_tiny.yaml --set train.steps=10 --set optim.max_lr=1e-3
    ccmega pretrain --preset qwen3-tiny --steps 10          # shortcut flags name dotted keys too

Precedence: dataclass defaults < YAML file < `--set` / shortcut flags (in command-line order).
Values are checked against the field types (int, float, bool, str, Optional[...], list[...]); an
unknown key is an error that lists the valid ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or the command line) converted to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, key) for v in value]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)  # also YAML 1.1 strings such as '3e-4'
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build `cls` from a (possibly partial) nested dict; missing fields keep their defaults."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
                          f"valid under {prefix or 'the top level'}: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def set_dotted(config: T, key: str, raw: Any) -> T:
    """A copy of `config` with the dotted `key` set to `raw` (a string from the command line, or a value)."""
    head, _, rest = key.partition(".")
    types_ = _field_types(type(config))
    if head not in types_:
        raise ConfigError(f"unknown config key {key!r}; valid here: {', '.join(types_)}")
    if rest:
        sub = getattr(config, head)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{key}: {head} is not a section")
        return dataclasses.replace(config, **{head: set_dotted(sub, rest, raw)})
    tp = types_[head]
    if isinstance(raw, str) and tp is not str and typing.get_origin(tp) not in (list, tuple):
        stripped = raw.strip()
        value = yaml.safe_load(stripped) if stripped else None
    else:
        value = raw
    return dataclasses.replace(config, **{head: _coerce(value, tp, key)})


def add_config_arguments(parser: argparse.ArgumentParser, shortcuts: dict[str, tuple[str, str]]) -> None:
    """`--config FILE`, repeatable `--set key=value`, and one flag per shortcut {flag: (key, help)}."""
    parser.add_argument("--config", help="YAML file (nested sections, as the dataclasses)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one dotted key, e.g. --set train.steps=10 (repeatable)")
    for flag, (key, help_) in shortcuts.items():
        parser.add_argument(flag, dest=_dest(key), default=None, metavar="V", help=f"{help_} (= --set {key}=V)")


def _dest(key: str) -> str:
    return "shortcut__" + key.replace(".", "__")


def parse_config(cls: type[T], argv: Sequence[str], shortcuts: dict[str, tuple[str, str]],
                 description: str = "", prog: str | None = None,
                 extra_arguments=None) -> tuple[T, argparse.Namespace]:
    """Parse `argv` into a `cls` instance (defaults < --config < --set/shortcuts). `extra_arguments(parser)`
    adds flags that are not config keys (they come back in the namespace)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, shortcuts)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(list(argv))
    try:
        return load_config(cls, args.config, overrides_from_args(args, shortcuts)), args
    except ConfigError as e:
        parser.error(str(e))


def overrides_from_args(args: argparse.Namespace, shortcuts: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value))
    for key, _ in shortcuts.values():
        value = getattr(args, _dest(key))
        if value is not None:
            pairs.append((key, value))
    return pairs


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[tuple[str, Any]] = ()) -> T:
    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    config = from_dict(cls, data)
    for key, value in overrides:
        config = set_dotted(config, key, value)
    return config


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
