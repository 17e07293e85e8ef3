"""What every stage's YAML config shares: a dataclass built from a mapping with every field
checked, `section.field=value` overrides, merging, and reading YAML with errors that name the line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megadoc_megatron.errors import InputError


def build_dataclass(cls, values: dict, where: str, path):
    """A dataclass from a mapping: unknown fields and wrong types are InputErrors naming `where` in `path`."""
    if not isinstance(values, dict):
        raise InputError(f"{where or 'the config'} must be a mapping, not {type(values).__name__}", path,
                         fix="write `key: value` pairs")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise InputError(f"unknown config field {name!r}", path,
                         fix=f"use one of: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value, key, path)
        else:
            kwargs[name] = _check_type(value, default, key, path)
    return cls(**kwargs)


def _check_type(value, default, key: str, path):
    if default is None or value is None or isinstance(default, dict) and isinstance(value, dict):
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise InputError(f"{key} must be true or false, not {value!r}", path, fix=f"e.g. {key.split('.')[-1]}: true")
    if isinstance(default, float) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, type(default)):
        raise InputError(f"{key} must be a {type(default).__name__}, not {value!r}", path,
                         fix=f"e.g. {key.split('.')[-1]}: {default!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optimizer.lr=1e-3", "model.preset=150M"]` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r} has no '='", fix="write --set section.field=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return nested


def merge_dicts(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = merge_dicts(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def read_yaml(path: Path, what: str) -> dict:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise InputError("config file not found", path, fix=f"give the path of {what}") from None
    except yaml.YAMLError as error:
        line = error.problem_mark.line + 1 if getattr(error, "problem_mark", None) else None
        raise InputError(f"not valid YAML ({getattr(error, 'problem', error)})", path, line,
                         fix="check the indentation and quoting on that line") from None
    if not isinstance(values, dict):
        raise InputError(f"the config must be a mapping of sections, not a {type(values).__name__}", path,
                         fix="write `section: {field: value}` pairs")
    return values
