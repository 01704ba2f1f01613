# SPDX-License-Identifier: Apache-2.0
"""Log-probabilities of given tokens (and the entropy) from final hidden states, without [B, S, V] logits.

Every loss that reads a language model's token log-probs (LM, SFT, DPO, PPO, GRPO and the old-policy /
reference scorers) goes through `read_log_probs(lm, readout, hidden, targets)`, with a `Readout` cell the loss
made once from `lm.readout_cell(temperature, entropy)`. The cell runs one of three paths, fixed when it is built:

- "cpu": the fused lm_head + log-softmax CPU kernel (kernels/cpu), chunked in C++ (log-probs only);
- "chunked": `context.loss_chunk_tokens` tokens at a time in MindSpore ops, on any device, with a hand-written
  backward that recomputes each chunk's logits, so between forward and backward only the hidden states live
  and only one chunk's [B, c, V] tensors exist at a time (chunks are ordered with ops.depend);
- "whole": the model's own logits over the whole sequence (an lm_head carrying LoRA, tensor parallelism, or
  `loss_chunk_tokens: 0`).

With u = h W^T / tau, p = softmax(u), t the target: log p_t = u_t - logsumexp(u), H = -sum_j p_j log p_j, and
for upstream gradients a (of log p_t) and e (of H):

    dL/du_j = a ([j = t] - p_j) - e p_j (log p_j + H),     dL/dh = (dL/du / tau) W,  dL/dW = (dL/du / tau)^T h.
"""
import mindspore as ms
from mindspore import nn, ops

from ms_llm.ops import graph as G
from ms_llm.ops import linear_log_probs

MODES = ("cpu", "chunked", "whole")


def logps_and_entropy(logits, targets, temperature: float = 1.0):
    """(log p(target) [B, T], entropy [B, T]) of whole logits [B, T, V] at `temperature` (the "whole" path)."""
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = ops.log_softmax(logits.astype(ms.float32), -1)
    logp = ops.gather_elements(logp_all, -1, targets.astype(ms.int32).expand_dims(-1)).squeeze(-1)
    entropy = -(ops.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


class Readout(nn.Cell):
    """(h [B, S, H] already times the logit multiplier, W [V, H], targets [B, S] int) -> (log p(target) [B, S],
    entropy [B, S] — zeros unless built with entropy=True), float32; see the module docstring. The "cpu" and
    "whole" paths differentiate automatically (the kernel has its own backward); `ChunkedReadout` adds the
    hand-written one. Build either with `make_readout`."""

    def __init__(self, mode: str, temperature: float = 1.0, entropy: bool = False, chunk_tokens: int = 1024,
                 compute_dtype=ms.float32):
        super().__init__(auto_prefix=False)
        if mode not in MODES:
            raise ValueError(f"readout mode must be one of {MODES}, got {mode!r}")
        if mode == "cpu" and entropy:
            raise ValueError("the CPU kernel readout computes log-probs only; the entropy needs the chunked path")
        self.mode, self.temperature, self.entropy = mode, float(temperature), bool(entropy)
        self.inv_tau, self.chunk_tokens, self.compute_dtype = 1.0 / float(temperature), int(chunk_tokens), compute_dtype

    def _positions(self, b: int) -> int:
        c = self.chunk_tokens // b
        return c if c > 0 else 1

    def _chunk(self, h, w):
        """log-softmax(h W^T / tau) [N, V] float32 of one chunk's rows h [N, H]."""
        if self.compute_dtype == ms.float32:
            z = G.matmul_nt_prim(h, w)
        else:
            z = G.cast(G.matmul_nt(h, w, self.compute_dtype), ms.float32)
        if self.inv_tau != 1.0:
            z = z * self.inv_tau
        return ops.log_softmax(z, -1)

    def _forward_chunk(self, h, w, t):
        logp_all = self._chunk(h, w)
        lp = ops.gather_elements(logp_all, -1, t.expand_dims(-1)).squeeze(-1)
        if self.entropy:
            return lp, -(ops.exp(logp_all) * logp_all).sum(-1)
        return lp, G.zeros_like(lp)

    def construct(self, hidden, w, targets):
        if self.mode == "cpu":
            lp = linear_log_probs(hidden, w, targets, self.compute_dtype, "cpu", self.inv_tau)
            return lp, G.zeros_like(lp)
        return self._chunked(hidden, w, targets)

    def _chunked(self, hidden, w, targets):
        b, s, k = hidden.shape
        targets = targets.astype(ms.int32)
        c = self._positions(b)
        lps, ents = (), ()
        dep = ops.zeros((), ms.float32)
        for a in range(0, s, c):
            e = a + c if a + c < s else s
            h = ops.depend(hidden[:, a:e], dep).reshape(-1, k)        # chunk i waits for chunk i-1
            lp, ent = self._forward_chunk(h, w, targets[:, a:e].reshape(-1))
            lps, ents = lps + (lp.reshape(b, e - a),), ents + (ent.reshape(b, e - a),)
            dep = lp.sum()
        return ops.concat(lps, 1), ops.concat(ents, 1)


class ChunkedReadout(Readout):
    """The "chunked" path: chunk by chunk forward, and the backward written out (module docstring)."""

    def construct(self, hidden, w, targets):
        return self._chunked(hidden, w, targets)

    def _mm(self, a, b):
        """a [N, V] x b [V, H] in the compute dtype -> float32."""
        if self.compute_dtype == ms.float32:
            return G.matmul(a, b)
        return G.cast(G.matmul(G.cast(a, self.compute_dtype), G.cast(b, self.compute_dtype)), ms.float32)

    def bprop(self, hidden, w, targets, out, dout):
        # Written so that no [N, V] tensor is ever scaled row by row: on MindSpore 2.7's CPU runtime a
        # [N, 1] -> [N, V] broadcast inside the chunk loop kept one [N, V] buffer per chunk alive until the graph
        # ended. The row factors go on the [N, H] side instead (module docstring's formula, rearranged):
        #   dL/dh = g (W_t - P) - e (Q + H P),   dL/dW = sum_rows onehot_t (g h) - p^T ((g + e H) h) - (p log p)^T (e h)
        # with P = p W, Q = (p log p) W, W_t the target's row of W, g and e the upstream gradients over tau.
        d_lp, d_ent = dout
        b, s, k = hidden.shape
        v = w.shape[0]
        t_all = targets.astype(ms.int32)
        c = self._positions(b)
        w32 = G.cast(w, ms.float32)
        dw, dh, dep = None, (), d_lp.sum()
        for a in range(0, s, c):
            e = a + c if a + c < s else s
            h = G.cast(ops.depend(hidden[:, a:e], dep).reshape(-1, k), ms.float32)   # chunk i waits for i-1
            t = t_all[:, a:e].reshape(-1)
            logp_all = self._chunk(h, w)
            p = ops.exp(logp_all)
            g = d_lp[:, a:e].reshape(-1, 1) * self.inv_tau
            pw = self._mm(p, w)
            dh_c = g * (G.gather(w32, t, 0) - pw)
            coef_h = g * h
            dw_c = G.segment_sum(coef_h, t, v)
            if self.entropy:
                pl = p * logp_all
                ent = pl.sum(-1, keepdims=True) * -1.0
                de = d_ent[:, a:e].reshape(-1, 1) * self.inv_tau
                dh_c = dh_c - de * (self._mm(pl, w) + ent * pw)
                dw_c = dw_c - G.matmul_tn(pl, de * h)
                coef_h = (g + de * ent) * h
            dw_c = dw_c - G.matmul_tn(p, coef_h)
            dh = dh + (G.cast(dh_c, hidden.dtype).reshape(b, e - a, k),)
            dw = dw_c if a == 0 else dw + dw_c
            dep = dw[0, 0]
        return ops.concat(dh, 1), G.cast(dw, w.dtype), G.zeros_like(targets)


def make_readout(mode: str, temperature: float = 1.0, entropy: bool = False, chunk_tokens: int = 1024,
                 compute_dtype=ms.float32) -> Readout:
    cls = ChunkedReadout if mode == "chunked" else Readout
    return cls(mode, temperature, entropy, chunk_tokens, compute_dtype)


def read_log_probs(lm, readout, hidden, targets):
    """(log p(target) [B, S], entropy [B, S]) of `lm`'s next-token distribution at the readout's temperature,
    from final hidden states [B, S, H]; targets [B, S] must be valid ids (clamp masked positions first)."""
    if readout.mode == "whole":
        logp, ent = logps_and_entropy(lm.logits(hidden), targets, readout.temperature)
        return logp, (ent if readout.entropy else ops.zeros_like(logp))
    w = lm.head_weight(hidden)
    if readout.mode == "chunked":
        # the chunked cell takes the weight as a tensor computed in this graph: handed the Parameter itself, its
        # custom backward's chunk loop failed to compile in MindSpore 2.7 (a loop body expecting a side-effect
        # argument it was not given). In the compute dtype this is the copy the matmuls read anyway.
        exact = readout.compute_dtype == ms.float32 and w.dtype == ms.float32
        w = w * 1.0 if exact else G.cast(w, readout.compute_dtype)
    return readout(lm.readout_input(hidden), w, targets)
