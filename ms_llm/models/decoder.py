# SPDX-License-Identifier: Apache-2.0
"""The decoder: one implementation for Llama-2/3, Qwen2/2.5 and Qwen3 (flags in ModelConfig).

Cell attribute names copy Hugging Face (`model.layers.0.self_attn.q_proj.weight`) so checkpoints map 1:1.
Precision: parameters are float32; matmuls run in `config.compute_dtype`; the residual stream, norms,
rotary, softmax and the returned logits are float32.

Two ways in:
  * `CausalLM(input_ids, attention_mask=None, position_ids=None, segment_ids=None)` -> logits [B, S, V],
    for training and scoring;
  * `CausalLM.step(...)` (wrapped by `generation.DecodeStep`) -> logits, the step's keys and values written
    into fixed-size KV caches, for incremental decoding without recompiling per token.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_llm import ops as F
from ms_llm.models.config import ModelConfig
from ms_llm.models.readout import make_readout, read_log_probs
from ms_llm.models.tensor_parallel import CopyToTP, ReduceFromTP, local_config
from ms_llm.ops import backend as B

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class WeightReader:
    """A cell with a `weight` that may be a ZeRO-3 shard (training/zero.py): what reads the weight calls
    `read_weight(after)`, the whole matrix either way. `after`: a tensor the gather must wait for (the input of
    the product), which fixes the order of the collectives on every rank. Subclasses set `self.zero = None` in
    __init__ (a class attribute would hide the gather cell MindSpore keeps among the sub-cells)."""

    def read_weight(self, after=None):
        if self.zero is None:
            return self.weight
        # one element of `after`, not `after` itself: the gather cell keeps its inputs for its backward, and an
        # activation held there (the sibling projection's output) would live until the backward pass
        return self.zero(self.weight, after.reshape((-1,))[:1])

    def gather_dtype(self):
        """The dtype a gathered weight travels in: what the product reads."""
        return ms.float32


class Linear(nn.Cell, WeightReader):
    """y = x W^T (+ b) with W stored [out, in] in float32 and the matmul in `compute_dtype`."""
    plain = True          # y depends on W alone (a LoRALinear adds its update: fused readouts must not skip it)

    def __init__(self, in_features, out_features, bias=False, compute_dtype=ms.float32, std=0.02, head=False):
        """head: the lm_head (its logits stay bitwise the same when the vocabulary grows; ops.linear)."""
        super().__init__()
        self.head = head
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = Parameter(initializer(Normal(std), (out_features, in_features), ms.float32), name="weight")
        self.has_bias = bias
        if bias:
            self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias")
        self.backend = B.choose("linear", compute_dtype)
        # True for a weight that takes no gradient (LoRA's base layers): the CPU kernel then skips the dW
        # product. GRAPH_MODE cannot read requires_grad, so whoever freezes weights calls mark_frozen_linears.
        self.frozen_weight = False
        self.zero = None

    def gather_dtype(self):
        return ms.float32 if self.backend == "cpu" else self.compute_dtype    # (the CPU kernels read float32)

    def fusable(self):
        """Whether a fused decoding kernel may read this weight directly: a plain float32 matrix on the CPU kernels,
        no ZeRO-3 gather (whose order the separate products fix), no LoRA update."""
        return self.plain and self.zero is None and self.backend == "cpu"

    def construct(self, x, after=None):
        """after: a tensor this product must follow (training/zero.py; default x)."""
        w = self.read_weight(x if after is None else after)
        y = F.linear(x, w, self.compute_dtype, self.backend, self.frozen_weight, self.head)
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return y


class Embedding(nn.Cell, WeightReader):
    """Token embedding with a Hugging Face style `weight` [V, H]."""

    def __init__(self, vocab_size, hidden_size, std=0.02):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (vocab_size, hidden_size), ms.float32), name="weight")
        self.zero = None

    def construct(self, input_ids):
        w = self.read_weight(input_ids)
        x = ops.gather(w, input_ids, 0)
        return x if w.dtype == ms.float32 else x.astype(ms.float32)     # (a frozen half-precision table)


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.eps, self.backend = eps, B.choose("rms_norm")

    def construct(self, x):
        w = self.weight if self.weight.dtype == ms.float32 else self.weight.astype(ms.float32)
        return F.rms_norm(x, w, self.eps, self.backend)


class Attention(nn.Cell):
    """Grouped-query self-attention with optional q/k/v bias (Qwen2) and q/k norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        cd, std = DTYPES[cfg.compute_dtype], cfg.initializer_range
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.tp = tp is not None          # cfg holds this rank's heads (models/tensor_parallel.py)
        if self.tp:
            self.tp_in, self.tp_out = CopyToTP(tp), ReduceFromTP(tp)
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, qkv_bias, cd, std)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, qkv_bias, cd, std)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, qkv_bias, cd, std)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, cfg.attention_bias, cd, std)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.compute_dtype = cd
        self.rotary_backend, self.backend = B.choose("rotary"), B.choose("attention", cd)

    def _heads(self, x, n):
        b, s, _ = x.shape
        return x.reshape(b, s, n, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, cos, sin, mask, cache_k=None, cache_v=None, decode=None):
        """x: [B, S, H] float32; cos/sin: [B, 1, S, D]; mask: [B, 1, S, Sk] float32 bias (ops.mask_bias).

        Decoding (`CausalLM.step`): caches [Bc, Nkv, C, D] and decode = (rows, slots, starts) as `ops.kv_attend`
        takes them; mask is unused. Returns (out [B, S, H] float32, new cache_k, new cache_v), the caches None
        where the backend wrote them in place.
        """
        if self.tp:
            x = self.tp_in(x)
        if cache_k is not None and x.shape[1] == 1 and self.q_proj.fusable() and self.k_proj.fusable() and \
                self.v_proj.fusable():
            q, k, v = F.linear_rows3(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            if self.q_proj.has_bias:
                q, k, v = q + self.q_proj.bias, k + self.k_proj.bias, v + self.v_proj.bias
        else:
            q = self.q_proj(x)
            k = self.k_proj(x, q)            # (`after`: a fixed order of ZeRO-3's gathers, training/zero.py)
            v = self.v_proj(x, k)
        q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv), self._heads(v, self.n_kv)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = F.apply_rotary(q, cos, sin, self.rotary_backend)
        k = F.apply_rotary(k, cos, sin, self.rotary_backend).astype(self.compute_dtype)
        v = v.astype(self.compute_dtype)
        if cache_k is None:
            out = F.attention(q, k, v, mask, self.scale, self.compute_dtype, self.backend)
        else:
            out, k, v = F.kv_attend(q, k, v, cache_k, cache_v, decode[0], decode[1], decode[2], self.scale,
                                    self.compute_dtype, self.backend)
        out = self.o_proj(out).astype(ms.float32)
        if self.tp:
            out = self.tp_out(out)
        return out, k, v


def mark_frozen_linears(model):
    """Record on every Linear whether its weight is frozen (after requires_grad changed; before compiling), and
    give a weight held in half precision the reference ops (the CPU kernels read float32 weights)."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            cell.frozen_weight = not cell.weight.requires_grad
            if cell.weight.dtype != ms.float32:
                cell.backend = B.choose("linear", cell.weight.dtype)
    if isinstance(model, CausalLM):
        model.choose_head_backends()


class MLP(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        cd, std = DTYPES[cfg.compute_dtype], cfg.initializer_range
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False, cd, std)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False, cd, std)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, cd, std)
        self.backend = B.choose("swiglu")
        self.tp = tp is not None
        if self.tp:
            self.tp_in, self.tp_out = CopyToTP(tp), ReduceFromTP(tp)

    def construct(self, x):
        if self.tp:
            x = self.tp_in(x)
        if not self.training and len(x.shape) == 3 and x.shape[1] == 1 and self.backend == "cpu" and \
                self.gate_proj.fusable() and self.up_proj.fusable():      # a decoding step
            h = F.swiglu_rows(x, self.gate_proj.weight, self.up_proj.weight)
        else:
            gate = self.gate_proj(x)
            h = F.swiglu(gate, self.up_proj(x, gate), self.backend)
        out = self.down_proj(h).astype(ms.float32)
        if self.tp:
            out = self.tp_out(out)
        return out


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def construct(self, x, cos, sin, mask, cache_k=None, cache_v=None, decode=None):
        """Returns x [B, S, H] float32; with caches, (x, new_k, new_v) (Attention.construct)."""
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, decode)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        if cache_k is None:
            return x
        return x, k, v


class LazyDecoderLayer(DecoderLayer):
    """A DecoderLayer compiled once and called per layer (`context.lazy_inline`, on by default on Ascend), as
    MindFormers builds its layers: 28 layers then compile as one sub-graph, not 28 unrolled copies."""

    @ms.lazy_inline
    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__(cfg, tp)


class DecoderModel(nn.Cell):
    """Embeddings, the layer stack and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        layer_cfg = cfg
        if tp is not None:
            layer_cfg = local_config(cfg, tp.size)
        layer = LazyDecoderLayer if B.lazy_inline() else DecoderLayer
        self.layers = nn.CellList([layer(layer_cfg, tp) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Cell):
    """Decoder-only language model. Call with int32 input_ids [B, S]; returns float32 logits [B, S, V]."""

    def __init__(self, config: ModelConfig, tp=None):
        """tp: a tensor_parallel.TPGroup to hold only this rank's slice of every layer (config stays whole)."""
        super().__init__()
        self.config, self.tp = config, tp
        self.model = DecoderModel(config, tp)
        self.tied = config.tie_word_embeddings
        if not self.tied:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, DTYPES[config.compute_dtype],
                                  config.initializer_range, head=True)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.num_layers = config.num_hidden_layers
        scaling = config.rope_scaling or {}
        self.dynamic_rope = scaling.get("rope_type", scaling.get("type")) == "dynamic"
        self.inv_freq = Tensor(F.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
        self.choose_head_backends()
        self.neftune_alpha = 0.0          # NEFTune noise scale while training (set by the SFT stage)
        self.frozen = False               # models/frozen.py: stays in eval mode whatever its parent's mode
        self.set_multipliers(config.embedding_multiplier, config.logit_multiplier)

    def choose_head_backends(self):
        """Backends of the readout: the tied lm_head product and the fused lm_head + log-softmax. A head weight
        held in half precision (a frozen or LoRA base, models/io.to_param_dtype) takes the reference ops."""
        # (a middle pipeline stage holds neither the embedding nor the lm_head)
        head = getattr(self.model, "embed_tokens", None) if self.tied else getattr(self, "lm_head", None)
        dtype = self.compute_dtype if head is None or head.weight.dtype == ms.float32 else head.weight.dtype
        self.head_backend = B.choose("linear", dtype)
        self.loss_backend = B.choose("lm_head_loss", dtype) if self.tp is None else "reference"
        self.lm_readout = self.readout_cell()

    def readout_cell(self, temperature: float = 1.0, entropy: bool = False):
        """A models/readout.py Readout for this model's log-probs at `temperature` (with the entropy if asked):
        the fused CPU kernel where it applies, else chunked (`context.loss_chunk_tokens`), else whole logits
        (an lm_head that is not a plain matrix, tensor parallelism, or chunking off). A loss builds its own in
        __init__ and reads through `readout.read_log_probs`."""
        head = None if self.tied else getattr(self, "lm_head", None)     # (a middle pipeline stage has none)
        plain = self.tp is None and (head is None or head.plain)
        chunk = B.loss_chunk_tokens()
        if plain and self.loss_backend == "cpu" and not entropy:
            mode = "cpu"
        elif plain and chunk > 0:
            mode = "chunked"
        else:
            mode = "whole"
        return make_readout(mode, temperature, entropy, chunk, self.compute_dtype)

    def head_weight(self, after=None):
        """The [V, H] lm_head matrix (the embedding when tied); `after`: what a ZeRO-3 gather of it follows."""
        return self.model.embed_tokens.read_weight(after) if self.tied else self.lm_head.read_weight(after)

    def add_flags_recursive(self, **flags):
        """set_train reaches every cell through this; a frozen model keeps training=False."""
        if getattr(self, "frozen", False) and "training" in flags:     # (pipeline stages skip __init__)
            flags = dict(flags, training=False)
        return super().add_flags_recursive(**flags)

    def set_multipliers(self, embedding: float, logit: float):
        """μP's forward multipliers (1.0: none). Read when a graph compiles: set them before the first call."""
        self.embedding_multiplier, self.logit_multiplier = float(embedding), float(logit)
        self.config = self.config.replace(embedding_multiplier=float(embedding), logit_multiplier=float(logit))

    def embed(self, input_ids):
        """Token embeddings [B, S, H] float32, times the embedding multiplier."""
        x = self.model.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        return x

    def readout_input(self, hidden):
        """What lm_head multiplies: the final hidden states times the logit multiplier."""
        if self.logit_multiplier != 1.0:
            return hidden * self.logit_multiplier
        return hidden

    def _inv_freq(self, seq_len):
        if self.dynamic_rope and seq_len > self.config.max_position_embeddings:
            return Tensor(F.rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling,
                                          seq_len, self.config.max_position_embeddings))
        return self.inv_freq

    def construct(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, embed_noise=None):
        """Logits for every position.

        Args:
            input_ids: [B, S] int32.
            attention_mask: [B, S] 1 for real tokens, 0 for padding (optional).
            position_ids: [B, S] int (optional; defaults to 0..S-1).
            segment_ids: [B, S] document ids for packed sequences; no attention across documents (optional).
            embed_noise: [B, S, H] float32 uniform in [-1, 1] (optional): NEFTune noise, used only while
                training, scaled by neftune_alpha / sqrt(S * H). It comes from the caller (drawn from the run's
                seed and the micro-batch index), so a resumed run adds exactly the noise it would have.
        Returns:
            [B, S, V] float32.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, embed_noise))

    def attention_inputs(self, b: int, s: int, attention_mask=None, position_ids=None, segment_ids=None):
        """(additive mask [B, 1, S, S], rotary cos, sin) for a [B, S] batch (what every layer reads)."""
        slots = ops.broadcast_to(ops.arange(s, dtype=ms.int32).reshape(1, s), (b, s))
        if position_ids is None:
            position_ids = slots
        mask = F.mask_bias(F.causal_mask(slots, slots, attention_mask, segment_ids, segment_ids))
        cos, sin = F.rope_cos_sin(position_ids, self._inv_freq(s))
        return mask, cos, sin

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, embed_noise=None):
        """Final-norm hidden states [B, S, H] float32 (what reward/value heads and chunked losses read)."""
        b, s = input_ids.shape
        mask, cos, sin = self.attention_inputs(b, s, attention_mask, position_ids, segment_ids)
        x = self.embed(input_ids)
        if embed_noise is not None and self.training and self.neftune_alpha > 0:   # NEFTune (Jain et al. 2023)
            x = x + embed_noise * (self.neftune_alpha / math.sqrt(s * x.shape[-1]))
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def logits(self, hidden):
        """lm_head over hidden states [..., H] -> float32 logits [..., V]."""
        hidden = self.readout_input(hidden)
        if self.tied:
            return F.linear(hidden, self.model.embed_tokens.read_weight(hidden), self.compute_dtype, self.head_backend,
                            head=True).astype(ms.float32)
        return self.lm_head(hidden).astype(ms.float32)

    def target_log_probs(self, hidden, targets):
        """log p(target) [B, S] float32 from final hidden states [B, S, H] and targets [B, S] in [0, V).

        Equal to `token_log_probs(self.logits(hidden), targets)`, read through `self.lm_readout`: the [B, S, V]
        logits never exist (forward or backward) unless the readout is "whole" (models/readout.py).
        """
        return read_log_probs(self, self.lm_readout, hidden, targets)[0]

    def step(self, input_ids, position_ids, rows, slots, starts, caches):
        """One incremental step over fixed-size KV caches (generation.py).

        Args:
            input_ids, position_ids: [B, T] int32 (T = 1 while decoding; the prompt width in a prefill).
            rows: [B] int32, the cache row each input row uses; slots: [B, T] int32, the cache slot of each token;
            starts: [B] int32, each row's first filled slot (`ops.kv_attend`).
            caches: tuple of 2*L tensors [Bc, Nkv, C, D] in the compute dtype (k0, v0, k1, v1, ...).
        Returns:
            (logits of each row's last position [B, V] float32, the new caches: () when the backend wrote them in
            place, the CPU kernel's case).
        """
        cos, sin = F.rope_cos_sin(position_ids, self._inv_freq(caches[0].shape[2]))
        x = self.embed(input_ids)
        new = ()
        for i in range(self.num_layers):
            x, k, v = self.model.layers[i](x, cos, sin, None, caches[2 * i], caches[2 * i + 1], (rows, slots, starts))
            if k is not None:
                new = new + (k, v)
        x = self.model.norm(x[:, -1:, :])
        return self.logits(x).squeeze(1), new

    def kv_in_place(self) -> bool:
        """True where `step` writes the caches in place (the CPU kernel) and returns no new ones."""
        return self.model.layers[0].self_attn.backend == "cpu"

    def empty_cache(self, batch_size: int, max_len: int):
        """Zero KV caches for `step`: tuple of 2*L tensors [B, Nkv, Smax, D] in compute dtype (each its own
        memory: the CPU kernel writes them in place)."""
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        return tuple(Tensor(np.zeros(shape, dtype=np.float32), self.compute_dtype)
                     for _ in range(2 * c.num_hidden_layers))
