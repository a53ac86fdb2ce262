"""A run config from YAML and ``--set key=value`` overrides, and back to YAML.

    cfg = load_config("train/configs/cpu_default.yaml", ["optim.lr=1e-5", "data.seq_len=64"])

Unknown keys fail with a suggestion (difflib), values are checked against the annotated types
(the error names the field). Hand-written rather than pydantic / OmegaConf / tyro: the schema is
plain dataclasses, and ~120 lines give exactly these messages without a dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, RunConfig


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(options))}"


def _check_value(where: str, value: Any, annotation) -> Any:
    """``value`` checked against (and, for int -> float, converted to) ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r} ({type(value).__name__}); quote it in YAML")
        return value
    if dataclasses.is_dataclass(annotation):  # a list of sections, e.g. thought.schedule.stages
        return value if isinstance(value, annotation) else from_dict(annotation, value, where)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _section(annotation):
    """The dataclass of a config section, for ``Section`` and optional ``Section | None`` fields; else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}{_suggest(str(key), known)}")
        annotation = hints[key]
        section = _section(annotation)
        if section is not None and value is None and _optional(annotation):
            kwargs[key] = None  # an optional section left empty is off
        elif section is not None:
            kwargs[key] = from_dict(section, value if value is not None else {}, path)
        else:
            kwargs[key] = _check_value(path, value, annotation)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str], root: type = RunConfig) -> dict:
    """``["optim.lr=1e-5", "logging.trackers=[]"]`` applied to a nested dict (values parsed as YAML);
    keys are checked against the dataclass ``root`` (a run config unless told otherwise)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-5), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = data, root
        for depth, part in enumerate(parts):
            known = {f.name: f for f in dataclasses.fields(cls)}
            dotted = ".".join(parts[: depth + 1])
            if part not in known:
                raise ConfigError(f"unknown config key {dotted!r} in --set {item!r}{_suggest(part, known)}")
            annotation = typing.get_type_hints(cls)[part]
            section = _section(annotation)
            if depth == len(parts) - 1:
                value = yaml.safe_load(raw) if raw.strip() else ""
                # An optional section may be set or switched off whole: --set model.lora={} / model.lora=null /
                # stage={kind: distill, teacher: DIR}.
                if section is not None and not (_optional(annotation) and (value is None or isinstance(value, dict))):
                    raise ConfigError(f"--set {dotted} needs a field of it, e.g. {dotted}.{dataclasses.fields(section)[0].name}=...")
                node[part] = value
            else:
                if section is None:
                    raise ConfigError(f"{dotted!r} is a value, not a section; --set {dotted}=...")
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                cls = section
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; the recipes are in train/configs/")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
