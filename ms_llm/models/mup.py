# SPDX-License-Identifier: Apache-2.0
"""μP, the maximal-update parametrization (Yang et al. 2022, "Tensor Programs V"), Adam form, for the decoder.

Hyperparameters tuned on a narrow proxy (hidden size `base_width`) carry over to a wider model when, with
the width multiplier m = hidden_size / base_width and σ the proxy's init std, η its learning rate:

    parameter                                   init std     Adam lr          forward
    hidden matrices (q/k/v/o, gate/up/down)     σ / √m       η · m^(-α)       -
    token embedding                             σ            η                x embedding_multiplier
    readout (lm_head, or the tied embedding)    0 (or σ)     η                logits x output_multiplier / m
    norms and biases                            -            η                -

An untied lm_head starts at zero (`mup.zero_readout`, the paper's advice): with std σ the initial logits
shrink like 1/√m and the narrow proxy starts with more random logits than the wide model. α = 1 is μP proper; seed 000 §1.2.5.2.3 fitted α = 0.85 on small models (`mup.lr_exponent`). Attention
keeps the 1/√head_dim scale: widening adds heads and leaves head_dim fixed, so the scale does not change with
m. The multipliers live in ModelConfig (embedding_multiplier, logit_multiplier); on export they are folded
into the weights (models/io.py), so Hugging Face readers see an ordinary Llama/Qwen checkpoint.

    apply(model, section, fresh)  -> set the multipliers; re-initialize (fresh) or re-parametrize (loaded)
    lr_scales(model, params, section) -> per-parameter learning-rate multipliers for AdamW
"""
import re

import mindspore as ms
import numpy as np
from mindspore.common.initializer import Normal, initializer

from ms_llm.errors import MsLlmError

HIDDEN = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def width_mult(hidden_size: int, base_width: int) -> float:
    return hidden_size / float(base_width)


def is_hidden_matrix(name: str, shape) -> bool:
    """Matrices whose both dimensions grow with width (μP's 'hidden weights')."""
    return len(shape) == 2 and bool(HIDDEN.search(name))


def multipliers(section, hidden_size: int) -> tuple:
    """(embedding multiplier, logit multiplier) for a model of this width."""
    return float(section.embedding_multiplier), float(section.output_multiplier) / width_mult(hidden_size,
                                                                                               section.base_width)


def apply(model, section, fresh: bool, init_std: float = None):
    """Put `model` (a CausalLM) in μP for `section` (the config's `mup`), in place.

    fresh: draw new hidden matrices with std init_std/√m (init_std defaults to the model's initializer_range)
    and zero an untied lm_head when `section.zero_readout`; the embedding keeps its std. Otherwise (loaded weights) only the embedding and readout are
    rescaled so that the model computes exactly the same function under the new multipliers.
    """
    cfg = model.config
    emb, logit = multipliers(section, cfg.hidden_size)
    if fresh:
        m = width_mult(cfg.hidden_size, section.base_width)
        std = (init_std if init_std is not None else cfg.initializer_range) / np.sqrt(m)
        for name, p in model.parameters_and_names():
            if is_hidden_matrix(name, p.shape):
                p.set_data(initializer(Normal(std), p.shape, ms.float32).init_data())
            elif name == "lm_head.weight" and section.zero_readout:
                p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
    else:
        old_emb, old_logit = model.embedding_multiplier, model.logit_multiplier
        params = dict(model.parameters_and_names())
        if model.tied and not np.isclose(old_emb / emb, old_logit / logit):
            raise MsLlmError(f"mup: the loaded model ties its embedding and lm_head, so it cannot be re-parametrized to "
                             f"embedding x{emb:g} and logits x{logit:g} from x{old_emb:g} and x{old_logit:g} "
                             "(one matrix cannot take both rescalings); start from untied weights or set "
                             "mup.embedding_multiplier and mup.output_multiplier so that they agree")
        w = params["model.embed_tokens.weight"]
        w.set_data(ms.Tensor(w.asnumpy() * np.float32(old_emb / emb)))
        if not model.tied:
            h = params["lm_head.weight"]
            h.set_data(ms.Tensor(h.asnumpy() * np.float32(old_logit / logit)))
    model.set_multipliers(emb, logit)
    return model


def lr_scales(model, params, section) -> list:
    """Learning-rate multiplier of each parameter in `params` (AdamW's order): m^-α for hidden matrices, 1 else."""
    names = {id(p): n for n, p in model.parameters_and_names()}
    scale = width_mult(model.config.hidden_size, section.base_width) ** (-float(section.lr_exponent))
    return [scale if is_hidden_matrix(names.get(id(p), p.name), p.shape) else 1.0 for p in params]
