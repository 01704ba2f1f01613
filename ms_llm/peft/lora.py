# SPDX-License-Identifier: Apache-2.0
"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    h = W x + (alpha / r) * B A dropout(x),   A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

`apply_lora` swaps the target Linear cells for LoRALinear cells that share the base weights (frozen) and add
`lora_A.weight` / `lora_B.weight`, so parameter names are PEFT's (`...q_proj.lora_A.weight`). Adapters
are saved as `adapter_model.safetensors` + `adapter_config.json` that Hugging Face PEFT loads. Merging
folds (alpha / r) * B A into W — with the scaling, which MindFormers' merge tool leaves at 1 by default.

Every LoRA layer of a model multiplies its update by one shared, untrained gate (`lora_gate`, 1.0).
`AdapterDisabled(model)` is the base model seen through the same cells with the gate at 0 for the length of
its own call: an RLHF reference for a LoRA policy with one base in memory.

Dropout draws no random stream: its mask is a hash of (key, layer, element index), where the key is one
shared int32 (`lora_noise_key`) that the updater sets before every micro-batch from (seed, step,
micro-batch, data rank) (`dropout_key`). A resumed run therefore drops the same elements as an
uninterrupted one; the ops are int32 arithmetic that every backend has (checked on CPU). The hash is murmur3's 32-bit finaliser over
(index * golden ratio) xor (key xor layer salt); an element is kept when the low 24 bits of its hash are at
least p * 2^24.
"""
import math
import os
import shutil
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_llm import ops as F
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, write_json_atomic
from ms_llm.models.decoder import CausalLM, Linear, WeightReader, mark_frozen_linears
from ms_llm.models.io import (frozen_dtype, load_pretrained, load_state_dict, resolve_model_dir, save_pretrained,
                              to_param_dtype)
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.models.shards import local_value

PEFT_PREFIX = "base_model.model."
_M32 = 0xFFFFFFFF
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35


def _as_int32(v: int) -> int:
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser (a bijection that mixes every input bit into every output bit)."""
    h &= _M32
    h ^= h >> 16
    h = (h * _MIX1) & _M32
    h ^= h >> 13
    h = (h * _MIX2) & _M32
    return h ^ (h >> 16)


def dropout_key(seed: int, step: int, micro: int, rank: int) -> int:
    """The int32 dropout key of one micro-batch: a function of where it is in the run, nothing else."""
    h = fmix32(seed)
    for v in (step, micro, rank):
        h = fmix32(h ^ fmix32(v + _GOLDEN))
    return _as_int32(h)


def _lsr(x, k: int):
    """Logical right shift of int32 bits (MindSpore's shift is arithmetic)."""
    return ops.bitwise_and(ops.bitwise_right_shift(x, Tensor(k, ms.int32)), Tensor((1 << (32 - k)) - 1, ms.int32))


def dropout_keep(shape, key, salt, p: float, dtype):
    """The inverted-dropout multiplier (0 or 1 / (1 - p)) for a tensor of `shape`, from int32 `key` and
    `salt` (see the module docstring); no gradient flows through it."""
    n = 1
    for d in shape:
        n *= d
    h = ops.arange(0, n, dtype=ms.int32).reshape(shape) * Tensor(_as_int32(_GOLDEN), ms.int32)
    h = ops.bitwise_xor(h, ops.bitwise_xor(key, salt))
    h = ops.bitwise_xor(h, _lsr(h, 16))
    h = h * Tensor(_as_int32(_MIX1), ms.int32)
    h = ops.bitwise_xor(h, _lsr(h, 13))
    h = h * Tensor(_as_int32(_MIX2), ms.int32)
    h = ops.bitwise_xor(h, _lsr(h, 16))
    keep = ops.bitwise_and(h, Tensor((1 << 24) - 1, ms.int32)) >= int(round(p * (1 << 24)))
    return ops.stop_gradient(keep.astype(dtype) * (1.0 / (1.0 - p)))


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(Linear):
    """A Linear whose output adds a scaled low-rank update; the base weight and bias are the original ones."""
    plain = False

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, gate: Parameter, noise_key: Parameter,
                 layer: int):
        nn.Cell.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = base.in_features, base.out_features, base.compute_dtype
        self.weight, self.has_bias = base.weight, base.has_bias
        if base.has_bias:
            self.bias = base.bias
        self.backend, self.head, self.frozen_weight = base.backend, base.head, base.frozen_weight
        self.zero = base.zero
        bound = 1.0 / math.sqrt(self.in_features)          # kaiming_uniform(a=sqrt(5)) on [r, in], as PEFT does
        a = np.random.uniform(-bound, bound, (r, self.in_features)).astype(np.float32)
        self.lora_A = _Weight(a)
        self.lora_B = _Weight(np.zeros((self.out_features, r), np.float32))
        self.scaling, self.p = alpha / r, dropout
        self.lora_gate = gate                               # shared by every LoRA layer of the model
        self.lora_noise_key = noise_key                     # shared too: the updater sets it per micro-batch
        self.noise_salt = Tensor(_as_int32(fmix32(layer + 1)), ms.int32)

    def construct(self, x, after=None):
        y = Linear.construct(self, x, after)
        h = x
        if self.training and self.p > 0:
            h = h * dropout_keep(h.shape, self.lora_noise_key, self.noise_salt, self.p, h.dtype)
        cd = self.compute_dtype
        first = y if after is None else ops.depend(y, after)      # (the order of ZeRO-3's gathers: training/zero.py)
        low = F.linear(h, self.lora_A.read_weight(first), cd, self.backend)
        delta = F.linear(low, self.lora_B.read_weight(low), cd, self.backend) * (self.lora_gate * self.scaling).astype(cd)
        return y + delta.astype(y.dtype)


class _Weight(nn.Cell, WeightReader):
    """A LoRA factor (`lora_A` [r, in] or `lora_B` [out, r]), read through `read_weight` (ZeRO-3 may shard it)."""

    def __init__(self, value):
        super().__init__()
        self.weight = Parameter(Tensor(value), name="weight")
        self.zero = None


def _parent(model, path):
    *parents, leaf = path.split(".")
    cell = model
    for p in parents:
        cell = cell[int(p)] if p.isdigit() else getattr(cell, p)
    return cell, leaf


def apply_lora(model: CausalLM, cfg: LoRAConfig) -> list:
    """Wrap every Linear named in cfg.targets (e.g. q_proj, v_proj, or all seven) and freeze everything else.

    Returns the LoRA parameters (the only trainable ones afterwards).
    """
    found = [(name, cell) for name, cell in model.cells_and_names()
             if isinstance(cell, Linear) and not isinstance(cell, LoRALinear) and name.split(".")[-1] in cfg.targets]
    if not found:
        raise MsLlmError(f"lora.targets {cfg.targets} match no Linear layer; names look like q_proj, k_proj, "
                         "v_proj, o_proj, gate_proj, up_proj, down_proj")
    params = []
    gate = Parameter(Tensor(1.0, ms.float32), name="lora_gate", requires_grad=False)
    key = Parameter(Tensor(0, ms.int32), name="lora_noise_key", requires_grad=False)
    for layer, (name, cell) in enumerate(found):
        wrapped = LoRALinear(cell, cfg.r, cfg.alpha, cfg.dropout, gate, key, layer)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, wrapped)
        wrapped.lora_A.weight.name = f"{name}.lora_A.weight"      # after attaching, which renames locally
        wrapped.lora_B.weight.name = f"{name}.lora_B.weight"
        params += [wrapped.lora_A.weight, wrapped.lora_B.weight]
    for name, p in model.parameters_and_names():
        p.requires_grad = is_lora_weight(name)
    mark_frozen_linears(model)
    object.__setattr__(model, "lora_config", cfg)
    object.__setattr__(model, "lora_gate", gate)
    object.__setattr__(model, "lora_noise_key", key)
    return params


def hold_base(model, dtype: str, key: str = "lora") -> str:
    """Hold every parameter of a LoRA model except its adapters in `dtype` (`<stage>.lora.base_dtype`: auto is
    bfloat16 on Ascend, float32 on CPU): the frozen base then takes half the memory, the adapters keep float32
    masters. Returns the dtype used. The exported model is merged from the float32 base on disk
    (stages/common.trained_model), not from these rounded weights."""
    dtype = frozen_dtype(dtype, f"{key}.base")
    if dtype != "float32":
        to_param_dtype(model, dtype, keep=lambda name: ".lora_" in name or name.startswith("lora_"))
        mark_frozen_linears(model)
    return dtype


def noise_key(net):
    """The dropout key Parameter of the LoRA layers inside `net` that use dropout, or None."""
    for _, cell in net.cells_and_names():
        if isinstance(cell, LoRALinear) and cell.p > 0:
            return cell.lora_noise_key
    return None


def is_lora_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class AdapterDisabled(nn.Cell):
    """The base of a LoRA model: calls it with every adapter switched off, then switches them back on.

    Same weights, same cells, no copy. Its outputs carry no gradient (a reference, not a policy). The gate is
    set and restored inside this cell's own graph, ordered around the model call, so the model called
    directly (or by a train step) always sees its adapters.
    """

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        if getattr(model, "lora_config", None) is None:
            raise MsLlmError("the adapter-disabled view needs a LoRA model (apply_lora or load_adapter first)")
        self.model, self.gate = model, model.lora_gate

    def add_flags_recursive(self, **flags):
        """Switching the view's mode would switch the policy's: the view leaves the mode alone (the adapters'
        dropout, the only mode-dependent part of a LoRA layer, is multiplied by the closed gate anyway)."""
        flags.pop("training", None)
        return super().add_flags_recursive(**flags) if flags else self

    def construct(self, input_ids, *args):
        off = ops.assign(self.gate, ops.zeros_like(self.gate))
        out = self.model(ops.depend(input_ids, off), *args)
        out = ops.depend(out, ops.assign(self.gate, ops.ones_like(self.gate)))
        return ops.stop_gradient(out)

    # What the losses read a language model through (models/readout.py): the base's, with the adapters off.
    def hidden_states(self, input_ids, *args):
        off = ops.assign(self.gate, ops.zeros_like(self.gate))
        out = self.model.hidden_states(ops.depend(input_ids, off), *args)
        out = ops.depend(out, ops.assign(self.gate, ops.ones_like(self.gate)))
        return ops.stop_gradient(out)

    def logits(self, hidden):
        off = ops.assign(self.gate, ops.zeros_like(self.gate))
        out = self.model.logits(ops.depend(hidden, off))
        out = ops.depend(out, ops.assign(self.gate, ops.ones_like(self.gate)))
        return ops.stop_gradient(out)

    def readout_input(self, hidden):
        return self.model.readout_input(hidden)

    def head_weight(self, after=None):
        return ops.stop_gradient(self.model.head_weight(after))

    def readout_cell(self, temperature: float = 1.0, entropy: bool = False):
        return self.model.readout_cell(temperature, entropy)


def lora_parameters(model) -> dict:
    """{structural name: Parameter} of the LoRA weights (see models.io.named_parameters)."""
    return {n: p for n, p in model.parameters_and_names() if is_lora_weight(n)}


def save_adapter(model, out_dir: str, base_model: str = None, weights: dict = None) -> list:
    """adapter_model.safetensors (PEFT key names) + adapter_config.json; returns the file names. `weights`:
    {name: array} to write instead of the parameters' values where it has them (ZeRO-3's gathered factors)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise MsLlmError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    os.makedirs(out_dir, exist_ok=True)
    weights = weights or {}
    tensors = {PEFT_PREFIX + n: weights[n] if n in weights else p.asnumpy() for n, p in lora_parameters(model).items()}
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors, {"format": "pt"})
    write_json_atomic(os.path.join(out_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": base_model})
    return ["adapter_model.safetensors", "adapter_config.json"]


def read_adapter(adapter_dir: str):
    """(LoRAConfig, {ms_llm parameter name: array}) from a PEFT adapter directory."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    raw = read_json(cfg_path, "the adapter config")
    if raw.get("peft_type") != "LORA" or raw.get("use_rslora") or raw.get("use_dora"):
        raise MsLlmError(f"{cfg_path}: only plain LoRA adapters are supported (peft_type LORA, no rsLoRA/DoRA)")
    targets = raw["target_modules"]
    cfg = LoRAConfig(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
                     sorted(targets) if isinstance(targets, list) else [targets])
    weights = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    weights = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in weights.items()}
    weights = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in weights.items()}
    return cfg, weights


def load_adapter(model: CausalLM, adapter_dir: str, name: str = "default") -> CausalLM:
    """Apply (if needed) and load an adapter; several can be loaded and switched with set_adapter."""
    cfg, weights = read_adapter(adapter_dir)
    current = getattr(model, "lora_config", None)
    if current is None:
        apply_lora(model, cfg)
    elif (current.r, sorted(current.targets)) != (cfg.r, sorted(cfg.targets)):
        raise MsLlmError(f"{adapter_dir}: r={cfg.r}, targets {cfg.targets} differ from the loaded adapters "
                         f"(r={current.r}, {current.targets}); load it on a fresh base model")
    params = lora_parameters(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise MsLlmError(f"{adapter_dir}: adapter keys do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    registry = getattr(model, "adapters", {})
    registry[name] = (cfg, weights)
    object.__setattr__(model, "adapters", registry)
    set_adapter(model, name)
    return model


def set_adapter(model, name: str):
    """Make a loaded adapter the active one (copies its weights and scaling into the LoRA layers)."""
    registry = getattr(model, "adapters", {})
    if name not in registry:
        raise MsLlmError(f"adapter '{name}' is not loaded; loaded: {sorted(registry)}")
    cfg, weights = registry[name]
    for n, p in lora_parameters(model).items():
        p.set_data(Tensor(local_value(p, weights[n])))
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            cell.scaling = cfg.scaling
    object.__setattr__(model, "lora_config", cfg)


def merge_lora(model: CausalLM, base: dict = None) -> CausalLM:
    """A plain float32 CausalLM with W + (alpha / r) B A folded into every adapted weight. `base`: the base's
    {name: float32 array} to merge into instead of the model's own (a base held in half precision)."""
    own = {n: p for n, p in model.parameters_and_names()}

    def weight(name):
        return base[name] if base is not None else np.asarray(own[name].asnumpy(), np.float32)
    state, merged = {}, {}
    for name, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            delta = cell.lora_B.weight.asnumpy() @ cell.lora_A.weight.asnumpy() * cell.scaling
            merged[f"{name}.weight"] = weight(f"{name}.weight") + delta
    for name in own:
        if ".lora_" not in name and not name.startswith("lora_"):
            state[name] = merged.get(name, weight(name))
    out = CausalLM(model.config)
    load_state_dict(out, state, strict=True, source="merge_lora")
    out.set_train(False)
    return out


def merge_and_verify(base_dir: str, adapter_dir: str, out_dir: str, tolerance: float = 1e-4, seed: int = 0) -> float:
    """`ms-llm merge-lora`: merge, save, reload the saved model and compare its logits with base + adapter.

    Returns the max abs logit difference; if it exceeds `tolerance` nothing is left in out_dir and
    MsLlmError is raised.
    """
    model = load_adapter(load_pretrained(base_dir), adapter_dir)
    model.set_train(False)
    probe = np.random.RandomState(seed).randint(0, model.config.vocab_size, (2, 32)).astype(np.int32)
    expected = model(Tensor(probe)).asnumpy()
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(merge_lora(model), tmp)
    src = resolve_model_dir(base_dir)
    for name in os.listdir(src):                     # carry the tokenizer files along
        if name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            shutil.copy(os.path.join(src, name), tmp)
    got = load_pretrained(tmp)(Tensor(probe)).asnumpy()
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MsLlmError(f"merge-lora: merged logits differ from base + adapter by {diff:.3g} > {tolerance}; "
                         "nothing was written")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return diff
