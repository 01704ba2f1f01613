# SPDX-License-Identifier: Apache-2.0
"""YAML + dotted overrides -> ExperimentConfig, strictly: unknown keys and wrong types name the key, the
file (and line) and the nearest valid key; cross-field rules are checked in validate.py."""
import dataclasses
import difflib
import re
import typing

import yaml

from ms_llm.config.schema import CPTPhase, DataSource, ExperimentConfig, SFTPhase
from ms_llm.config.validate import validate
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_text

_NESTED_LISTS = {"data.sources": DataSource, "sft.phases": SFTPhase, "sft.phases.sources": DataSource,
                 "cpt.phases": CPTPhase}


def _list_item_type(key: str):
    return _NESTED_LISTS.get(re.sub(r"\[\d+\]", "", key))


def _key_lines(text: str) -> dict:
    """{dotted key: 1-based line} for every mapping key in a YAML document."""
    lines = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{prefix[:-1]}[{i}].")
    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _all_keys(cls, prefix="") -> list:
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(f.type):
            out.extend(_all_keys(f.type, key + "."))
    return out


def _suggest(key: str, section_cls) -> str:
    leaf = key.split(".")[-1].split("]")[-1]
    section = [f.name for f in dataclasses.fields(section_cls)]
    close = difflib.get_close_matches(leaf, section, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{key.rsplit('.', 1)[0] + '.' + close[0] if '.' in key else close[0]}'?"
    elsewhere = [k for k in _all_keys(ExperimentConfig) if k.split(".")[-1] == leaf]
    return f"; did you mean '{elsewhere[0]}'?" if elsewhere else ""


def _check_type(value, tp, key, where):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:                      # Optional[X]
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)                     # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    expected = origin or tp
    if expected is typing.Any or isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise MsLlmError(f"{where}: key '{key}' must be {getattr(expected, '__name__', expected)}, "
                     f"got {type(value).__name__} {value!r}")


def _check_range(value, interval: str, key: str, where: str):
    """Numbers must lie in the field's interval (default "[0, inf)"), e.g. optim.lr in "(0, inf)"."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    interval = interval or "[0, inf)"
    low, high = (float(x) for x in interval[1:-1].split(","))
    ok = (value > low if interval[0] == "(" else value >= low) and (value < high if interval[-1] == ")" else value <= high)
    if not ok:
        raise MsLlmError(f"{where}: key '{key}' = {value!r} is outside its range {interval}")


def _at(where: str, lines: dict, key: str) -> str:
    """'file:line' for a key from the YAML file, or the command-line override that set it."""
    origin = lines.get(key)
    if isinstance(origin, str):
        return f"{where} (command-line override '{origin}')"
    return f"{where}:{origin}" if origin else where


def _build(cls, raw, prefix, where, lines):
    if not isinstance(raw, dict):
        raise MsLlmError(f"{where}: key '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = prefix + str(k)
        if k not in fields:
            at = _at(where, lines, key)
            raise MsLlmError(f"{at}: unknown key '{key}'{_suggest(key, cls)}")
        f = fields[k]
        at = _at(where, lines, key)
        if dataclasses.is_dataclass(f.type):
            if v is not None and not isinstance(v, dict):
                first = dataclasses.fields(f.type)[0].name
                raise MsLlmError(f"{at}: key '{key}' is a section, not a value; write its keys, e.g. "
                                 f"'{key}: {{{first}: {v!r}}}' ({key}.{first}=... on the command line)")
            kwargs[k] = _build(f.type, v or {}, key + ".", where, lines)
        elif _list_item_type(key):
            if not isinstance(v, list):
                raise MsLlmError(f"{at}: key '{key}' must be a list")
            kwargs[k] = [_build(_list_item_type(key), item, f"{key}[{i}].", where, lines) for i, item in enumerate(v)]
        else:
            aliases = f.metadata.get("aliases") or {}
            if isinstance(v, bool) and v in aliases:
                v = aliases[v]
            kwargs[k] = _check_type(v, f.type, key, at)
            _check_range(kwargs[k], f.metadata.get("range"), key, at)
            choices = f.metadata.get("choices")
            if choices and kwargs[k] not in choices:
                raise MsLlmError(f"{at}: key '{key}' = {v!r} is not one of {choices}")
    return cls(**kwargs)


def parse_override(text: str):
    """'a.b=c' -> (['a', 'b'], parsed YAML value of c)."""
    if "=" not in text:
        raise MsLlmError(f"override '{text}' must look like section.key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise MsLlmError(f"override '{text}': value is not valid YAML ({e})") from None


def load_config(path: str, overrides=(), check: bool = True) -> ExperimentConfig:
    """Read YAML, apply dotted overrides, build strictly and (unless `check` is false) validate."""
    text = read_text(path, "config")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else path
        raise MsLlmError(f"{at}: YAML syntax error ({getattr(e, 'problem', e)})") from None
    lines = _key_lines(text)
    for ov in overrides:
        keys, value = parse_override(ov)
        node = raw
        for k in keys[:-1]:
            m = re.fullmatch(r"(\w+)\[(\d+)\]", k)          # list element, e.g. sft.phases[1].max_steps
            if m:
                items = node.get(m.group(1))
                if not isinstance(items, list) or int(m.group(2)) >= len(items):
                    raise MsLlmError(f"override '{ov}': '{m.group(1)}' has no element {m.group(2)}")
                node = items[int(m.group(2))]
            else:
                node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise MsLlmError(f"override '{ov}': '{k}' is not a section")
        node[keys[-1]] = value
        lines[".".join(keys)] = ov
    cfg = _build(ExperimentConfig, raw, "", path, lines)
    if check:
        validate(cfg, path)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def help_text() -> str:
    """Every config key with its default and help, for `ms-llm train --help-config`."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type):
                out.append(f"\n[{prefix}{f.name}]  {f.metadata.get('help', '')}")
                walk(f.type, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices, interval = f.metadata.get("choices"), f.metadata.get("range")
            extra = f" (one of {', '.join(choices)})" if choices else ""
            if f.type in (int, float, typing.Optional[int], typing.Optional[float]):
                extra += f" (range {interval or '[0, inf)'})"
            out.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}{extra}")
            item = _list_item_type((prefix + f.name).replace("[]", ""))
            if item:
                walk(item, prefix + f.name + "[].")
    walk(ExperimentConfig, "")
    return "\n".join(out).lstrip()
