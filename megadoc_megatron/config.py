"""What every stage's YAML config shares: a dataclass built from a mapping with every field
checked, `section.field=value` overrides, merging, and reading YAML with errors that name the line."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import read_utf8


def build_dataclass(cls, values: dict, where: str, path):
    """A dataclass from a mapping: unknown fields and values that are not of a field's declared type
    (also where its default is None) are InputErrors naming `where` in `path`; null leaves a field
    that cannot be None at its default."""
    if not isinstance(values, dict):
        raise InputError(f"{where or 'the config'} must be a mapping, not {type(values).__name__}", path,
                         fix="write `key: value` pairs")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise InputError(f"unknown config field {name!r}", path,
                         fix=f"use one of: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kind = _declared(hints[name])
        if value is None and type(None) not in typing.get_args(hints[name]):
            continue  # `key: null` (or `--set key=`) leaves a field that cannot be None at its default
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build_dataclass(kind, value, key, path)
        else:
            kwargs[name] = _checked(value, kind, key, path)
    return cls(**kwargs)


def _declared(hint):
    """The type a field holds when set: `int | None` -> int, `list[str]` -> list."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] \
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    kind = options[0] if len(options) == 1 else object
    return typing.get_origin(kind) or kind


NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
         dict: "a mapping", Path: "a path"}


def _checked(value, kind, key: str, path):
    """The value as the field's type (YAML 1.1 reads `1e-3` and `1e3` as strings: numbers are parsed),
    or an InputError naming the key, the type and the value."""
    if value is None:
        return value
    if kind in (float, int) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        if isinstance(value, int):
            return kind(value)  # exact, however large
        number = _number(value)
        if number is not None and (kind is float or number == int(number)):
            return kind(number)
    elif kind is Path and isinstance(value, str) or kind is object:
        return value
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    name = key.split(".")[-1]
    raise InputError(f"{key} must be {NAMES.get(kind, kind.__name__)}, not {value!r}", path,
                     fix=f"e.g. {name}: {_example(kind)}")


def _number(value) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _example(kind) -> str:
    return {bool: "true", int: "1000", float: "1.0e-3", str: "text", list: "[a, b]", dict: "{key: value}"}.get(
        kind, "...")


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
        values = yaml.safe_load(read_utf8(path)) or {}
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
