# SPDX-License-Identifier: Apache-2.0
"""ModelConfig: one decoder description for the Llama-2/3, Qwen2/2.5 and Qwen3 families, plus presets.

The families differ only by flags: Qwen2 adds q/k/v biases, Qwen3 adds per-head RMSNorm on q and k,
tied embeddings are a flag. `ModelConfig.from_hf_config` reads a Hugging Face `config.json` dict and
`to_hf_config` writes one that `transformers` loads.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from ms_llm.errors import MsLlmError

# architectures entry -> family name
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_FAMILY_TO_ARCH = {v: k for k, v in HF_ARCHITECTURES.items()}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
MUP_KEY = "ms_llm_mup"          # config.json entry recording folded μP multipliers


@dataclass
class ModelConfig:
    """Shape and flags of the decoder. Field names follow Hugging Face `config.json`."""
    family: str = "llama"
    """Model family: llama, qwen2 or qwen3 (decides the config.json `architectures` entry)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    """Grouped-query attention: number of key/value heads (defaults to num_attention_heads)."""
    head_dim: Optional[int] = None
    """Per-head size (defaults to hidden_size // num_attention_heads; Qwen3 sets it explicitly)."""
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": f, ...} as in Hugging Face."""
    attention_bias: bool = False
    """Bias on q/k/v/o projections (Llama style flag)."""
    qkv_bias: bool = False
    """Bias on q/k/v only (Qwen2/2.5)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before rotary (Qwen3)."""
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list]] = 2
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    embedding_multiplier: float = 1.0
    """Token embeddings are multiplied by this (μP; see models/mup.py). Folded into the weights on export."""
    logit_multiplier: float = 1.0
    """Final hidden states are multiplied by this before lm_head (μP: output_multiplier x base_width / width)."""
    compute_dtype: str = "float32"
    """dtype of matmuls (float32, float16, bfloat16); parameters, norms, softmax and rotary stay float32."""
    extra: dict = field(default_factory=dict)
    """Unrecognised config.json keys, carried through to `to_hf_config` untouched."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self):
        """Raise MsLlmError naming the field when the shape is inconsistent."""
        if self.family not in _FAMILY_TO_ARCH:
            raise MsLlmError(f"model.family: '{self.family}' is not supported; use one of {sorted(_FAMILY_TO_ARCH)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MsLlmError(f"model.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise MsLlmError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.embedding_multiplier > 0 and self.logit_multiplier > 0):
            raise MsLlmError("model.embedding_multiplier and model.logit_multiplier must be positive")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise MsLlmError(f"model.compute_dtype: '{self.compute_dtype}' is not one of {COMPUTE_DTYPES}")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "linear", "dynamic", "llama3"):
            raise MsLlmError(f"model.rope_scaling: rope_type '{kind}' is not supported "
                             "(use linear, dynamic or llama3)")

    @property
    def eos_ids(self) -> list:
        """eos_token_id as a list (Llama-3.1 configs give several)."""
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict; unsupported architectures raise MsLlmError naming `source`."""
        archs = hf.get("architectures") or []
        family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if family is None:
            family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(hf.get("model_type")) if not archs else None
        if family is None:
            raise MsLlmError(f"{source}: key 'architectures' = {archs} is not supported; ms_llm loads "
                             f"{sorted(HF_ARCHITECTURES)}")
        if hf.get("use_sliding_window"):
            raise MsLlmError(f"{source}: key 'use_sliding_window' = true is not supported")
        if hf.get("mlp_bias"):
            raise MsLlmError(f"{source}: key 'mlp_bias' = true is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"family", "qkv_bias", "qk_norm", "extra", "compute_dtype",
                                                          "embedding_multiplier", "logit_multiplier"}
        token_ids = ("bos_token_id", "eos_token_id", "pad_token_id")   # None is meaningful for these
        kwargs = {k: hf[k] for k in known if k in hf and (hf[k] is not None or k in token_ids)}
        if "rope_scaling" not in hf and isinstance(hf.get("rope_parameters"), dict):
            rp = hf["rope_parameters"]   # transformers 5 folds rope_theta into rope_parameters
            kwargs.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if hf.get("hidden_act", "silu") != "silu":
            raise MsLlmError(f"{source}: key 'hidden_act' = '{hf['hidden_act']}' is not supported (only silu)")
        mup = hf.get(MUP_KEY)
        if mup is not None:          # written by to_hf_config: the weights on disk have the multipliers folded in
            if not isinstance(mup, dict) or not {"embedding_multiplier", "logit_multiplier"} <= set(mup):
                raise MsLlmError(f"{source}: key '{MUP_KEY}' needs embedding_multiplier and logit_multiplier")
            kwargs.update(embedding_multiplier=float(mup["embedding_multiplier"]),
                          logit_multiplier=float(mup["logit_multiplier"]),
                          tie_word_embeddings=bool(mup.get("tie_word_embeddings", kwargs.get("tie_word_embeddings"))))
        skip = known | {"architectures", "model_type", "hidden_act", "torch_dtype", "dtype", "rope_parameters",
                        "transformers_version", "use_cache", "use_sliding_window", "mlp_bias", MUP_KEY}
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(family=family, qkv_bias=family == "qwen2", qk_norm=family == "qwen3", extra=extra, **kwargs)

    @property
    def has_multipliers(self) -> bool:
        return self.embedding_multiplier != 1.0 or self.logit_multiplier != 1.0

    def to_hf_config(self) -> dict:
        """A config.json dict for `transformers` (float32 weights)."""
        out = dict(self.extra)
        out.update({
            "architectures": [_FAMILY_TO_ARCH[self.family]], "model_type": self.family, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "attention_bias": self.attention_bias, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "initializer_range": self.initializer_range,
            "torch_dtype": "float32", "use_cache": True,
        })
        if self.family == "qwen2":
            out["use_sliding_window"] = False
        if self.has_multipliers:
            # Plain Llama/Qwen readers know no multipliers: save_pretrained folds them into the weights (which
            # needs a separate lm_head); this entry lets ms_llm restore the parametrization it trains in.
            out["tie_word_embeddings"] = False
            out[MUP_KEY] = {"embedding_multiplier": self.embedding_multiplier,
                            "logit_multiplier": self.logit_multiplier, "tie_word_embeddings": self.tie_word_embeddings}
        return out

    def num_parameters(self) -> int:
        """Every parameter of the decoder the config describes (the count `CausalLM` builds): q/k/v biases
        (Qwen2), o bias (attention_bias) and per-head q/k norms (Qwen3) included."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        if self.qkv_bias or self.attention_bias:
            per_layer += q + 2 * kv
        if self.attention_bias:
            per_layer += h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h


_QWEN_COMMON = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                    max_position_embeddings=32768)

PRESETS = {
    "tiny": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2.5-0.5b": dict(family="qwen2", qkv_bias=True, vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, **_QWEN_COMMON),
    "qwen2.5-1.5b": dict(family="qwen2", qkv_bias=True, vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, **_QWEN_COMMON),
    "qwen2.5-7b": dict(family="qwen2", qkv_bias=True, vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, **_QWEN_COMMON),
    "qwen2.5-72b": dict(family="qwen2", qkv_bias=True, vocab_size=152064, hidden_size=8192,
                        intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, **_QWEN_COMMON),
    "qwen3-8b": dict(family="qwen3", qk_norm=True, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     **dict(_QWEN_COMMON, max_position_embeddings=40960)),
    "llama3-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=128000, eos_token_id=128001),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise MsLlmError(f"model.preset: '{name}' is not a preset; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
