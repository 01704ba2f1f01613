# SPDX-License-Identifier: Apache-2.0
"""YAML + dotted overrides -> ExperimentConfig, strictly: unknown keys and wrong types name the key, the
file (and line) and the nearest valid key; cross-field rules are checked in `validate`."""
import dataclasses
import difflib
import re
import typing

import yaml

from ms_llm.config.schema import CPTPhase, DataSource, ExperimentConfig, SFTPhase
from ms_llm.errors import MsLlmError

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
            kwargs[k] = _build(f.type, v or {}, key + ".", where, lines)
        elif _list_item_type(key):
            if not isinstance(v, list):
                raise MsLlmError(f"{at}: key '{key}' must be a list")
            kwargs[k] = [_build(_list_item_type(key), item, f"{key}[{i}].", where, lines) for i, item in enumerate(v)]
        else:
            kwargs[k] = _check_type(v, f.type, key, at)
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
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise MsLlmError(f"{path}: cannot read config ({e.strerror})") from None
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


def _check_pipeline(cfg: ExperimentConfig, where: str):
    par = cfg.parallel
    if cfg.stage not in ("pretrain", "cpt"):
        raise MsLlmError(f"{where}: parallel.pipeline_stages is supported by the pretrain and cpt stages, not by stage "
                         f"'{cfg.stage}' in this release")
    for key, on in (("parallel.tensor_parallel", par.tensor_parallel > 1), ("parallel.optimizer_shard", par.optimizer_shard)):
        if on:
            raise MsLlmError(f"{where}: {key} together with parallel.pipeline_stages is not supported in this "
                             "release; choose one")
    if cfg.stage == "cpt" and (cfg.cpt.monitor.sets or cfg.cpt.monitor.choice_sets):
        raise MsLlmError(f"{where}: cpt.monitor evaluates the whole model on one rank and does not run under "
                         "parallel.pipeline_stages in this release; use data_parallel/tensor_parallel, or drop "
                         "cpt.monitor.sets and cpt.monitor.choice_sets")
    if cfg.model.preset and not cfg.model.init_from:     # init_from models are checked when loaded
        from ms_llm.models.config import preset
        from ms_llm.models.pipeline import check_config
        try:
            shape = preset(cfg.model.preset, **cfg.model.overrides)
        except TypeError:
            return                                        # reported with the model section when built
        try:
            check_config(shape, par.pipeline_stages)
        except MsLlmError as e:
            raise MsLlmError(f"{where}: {e}") from None


def validate(cfg: ExperimentConfig, where: str = "config"):
    """Cross-field rules; each failure names the keys involved."""
    t = cfg.train
    if t.global_batch_size is not None and t.global_batch_size != cfg.global_batch:
        raise MsLlmError(f"{where}: train.global_batch_size ({t.global_batch_size}) must equal micro_batch_size "
                         f"({t.micro_batch_size}) x grad_accum_steps ({t.grad_accum_steps}) x parallel.data_parallel "
                         f"({cfg.parallel.data_parallel}) = {cfg.global_batch}")
    for key, value in (("train.max_steps", t.max_steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.grad_accum_steps", t.grad_accum_steps), ("data.seq_len", cfg.data.seq_len),
                       ("parallel.data_parallel", cfg.parallel.data_parallel)):
        if value < 1:
            raise MsLlmError(f"{where}: {key} must be at least 1, got {value}")
    if cfg.lr_schedule.warmup_steps >= t.max_steps and t.max_steps > 1:
        raise MsLlmError(f"{where}: lr_schedule.warmup_steps ({cfg.lr_schedule.warmup_steps}) must be below "
                         f"train.max_steps ({t.max_steps})")
    par = cfg.parallel
    if par.pipeline_stages < 1:
        raise MsLlmError(f"{where}: parallel.pipeline_stages must be at least 1, got {par.pipeline_stages}")
    if par.pipeline_stages > 1:
        _check_pipeline(cfg, where)
    if par.tensor_parallel < 1:
        raise MsLlmError(f"{where}: parallel.tensor_parallel must be at least 1, got {par.tensor_parallel}")
    if par.tensor_parallel > 1:
        if cfg.stage not in ("pretrain", "cpt"):
            raise MsLlmError(f"{where}: parallel.tensor_parallel is supported by the pretrain and cpt stages, not by "
                             f"stage '{cfg.stage}' in this release")
        if par.optimizer_shard:
            raise MsLlmError(f"{where}: parallel.optimizer_shard together with tensor_parallel is not supported in "
                             "this release; choose one")
        if cfg.model.preset and not cfg.model.init_from:     # init_from models are checked when loaded
            from ms_llm.models.config import preset
            from ms_llm.models.tensor_parallel import check_config
            try:
                shape = preset(cfg.model.preset, **cfg.model.overrides)
            except TypeError:
                shape = None                                  # reported with the model section when built
            if shape is not None:
                try:
                    check_config(shape, par.tensor_parallel)
                except MsLlmError as e:
                    raise MsLlmError(f"{where}: {e}") from None
    if par.optimizer_shard and par.data_parallel < 2:
        raise MsLlmError(f"{where}: parallel.optimizer_shard splits the optimizer state over data-parallel ranks; "
                         f"it needs parallel.data_parallel >= 2, got {par.data_parallel}")
    if t.amp_level == "O3":
        raise MsLlmError(f"{where}: train.amp_level O3 (half-precision master weights) is not supported; use O2 "
                         "(half-precision matmuls, float32 master weights)")
    if not cfg.model.preset and not cfg.model.init_from:
        raise MsLlmError(f"{where}: set model.preset or model.init_from")
    for i, ph in enumerate(cfg.sft.phases):
        mbs = ph.micro_batch_size or t.micro_batch_size
        acc = ph.grad_accum_steps or t.grad_accum_steps
        if ph.global_batch_size is not None and ph.global_batch_size != mbs * acc * cfg.parallel.data_parallel:
            raise MsLlmError(f"{where}: sft.phases[{i}].global_batch_size ({ph.global_batch_size}) must equal "
                             f"micro_batch_size ({mbs}) x grad_accum_steps ({acc}) x data_parallel "
                             f"({cfg.parallel.data_parallel})")
    if not cfg.data.sources and not (cfg.data.index and cfg.stage in ("pretrain", "cpt")):
        raise MsLlmError(f"{where}: data.sources is empty; list at least one JSONL file"
                         + (" or set data.index" if cfg.stage in ("pretrain", "cpt") else ""))
    if cfg.data.index and cfg.stage not in ("pretrain", "cpt"):
        raise MsLlmError(f"{where}: data.index is read by the pretrain and cpt stages, not by stage '{cfg.stage}'")
    if cfg.stage == "cpt":
        c = cfg.cpt
        if not c.phases:
            raise MsLlmError(f"{where}: cpt.phases is empty; give at least one {{name, weights}} phase")
        ends = [ph.until_tokens for ph in c.phases[:-1]]
        if any(e is None for e in ends) or ends != sorted(ends):
            raise MsLlmError(f"{where}: cpt.phases[*].until_tokens must be set and increasing for every phase but "
                             "the last")
        for i, ph in enumerate(c.phases):
            if not ph.weights or any(w < 0 for w in ph.weights.values()) or sum(ph.weights.values()) <= 0:
                raise MsLlmError(f"{where}: cpt.phases[{i}].weights needs non-negative weights with a positive sum")
        if (c.monitor.sets or c.monitor.choice_sets) and not t.eval_every:
            raise MsLlmError(f"{where}: cpt.monitor.sets / choice_sets need train.eval_every (the monitor runs at "
                             "evaluations)")
    if cfg.stage == "distill":
        d = cfg.distill
        if not d.teacher:
            raise MsLlmError(f"{where}: distill.teacher is required for stage: distill")
        if d.mode == "cached" and not d.cache_dir:
            raise MsLlmError(f"{where}: distill.mode: cached needs distill.cache_dir (write it with "
                             "`ms-llm distill cache-teacher CONFIG`)")
        if d.mode == "cached" and d.iterative.every:
            raise MsLlmError(f"{where}: distill.iterative needs distill.mode: online (hard examples added during "
                             "training have no cached teacher logits)")
        if d.temperature <= 0 or d.alpha < 0 or d.beta < 0 or d.alpha + d.beta <= 0:
            raise MsLlmError(f"{where}: distill.temperature must be > 0 and distill.alpha, distill.beta >= 0 "
                             "with a positive sum")
        if d.iterative.every and (not t.eval_every or d.iterative.every % t.eval_every):
            raise MsLlmError(f"{where}: distill.iterative.every ({d.iterative.every}) must be a multiple of "
                             f"train.eval_every ({t.eval_every}): hard-example rounds run at evaluations")
        if d.top_k < 1 or d.chunk_size < 1:
            raise MsLlmError(f"{where}: distill.top_k and distill.chunk_size must be at least 1")
    mu = cfg.mup
    if mu.enabled:
        if mu.base_width < 1 or not 0 <= mu.lr_exponent <= 2:
            raise MsLlmError(f"{where}: mup.base_width must be at least 1 and mup.lr_exponent in [0, 2], got "
                             f"{mu.base_width} and {mu.lr_exponent}")
        if mu.embedding_multiplier <= 0 or mu.output_multiplier <= 0 or (mu.init_std is not None and mu.init_std <= 0):
            raise MsLlmError(f"{where}: mup.embedding_multiplier, mup.output_multiplier and mup.init_std must be positive")
        if cfg.stage == "sft" and cfg.sft.lora.enabled:
            raise MsLlmError(f"{where}: mup.enabled with sft.lora: LoRA adapters have no μP rule here; disable one")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise MsLlmError(f"{where}: data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")


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
            choices = f.metadata.get("choices")
            extra = f" (one of {', '.join(choices)})" if choices else ""
            out.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}{extra}")
            item = _list_item_type((prefix + f.name).replace("[]", ""))
            if item:
                walk(item, prefix + f.name + "[].")
    walk(ExperimentConfig, "")
    return "\n".join(out).lstrip()
