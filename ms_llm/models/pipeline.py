# SPDX-License-Identifier: Apache-2.0
"""Pipeline parallelism for the decoder: the layer stack cut into `size` consecutive stages, one per rank.

    stage 0            embedding + its layers
    stage 1 ... P-2    their layers
    stage P-1          its layers + final norm + lm_head (a tied model keeps a copy of the embedding here)

A stage's parameters keep the whole model's names (`model.layers.17.mlp.up_proj.weight` on the stage that
holds layer 17), so optimizer state, checkpoints and `final/` read the same as a one-process run's. Layers are
split as evenly as possible, earlier stages taking the remainder. The schedule that trains the stages is in
training/pipeline.py; this module holds the model side: which layers a rank owns (`PPGroup`, `split_layers`),
the stage cell (`StageModel`) and whole-model gathers for checkpoints (`gather_stages`).
"""
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm import ops as F
from ms_llm.errors import MsLlmError
from ms_llm.models.decoder import DTYPES, CausalLM, DecoderLayer, Embedding, Linear, RMSNorm
from ms_llm.models.io import load_state_dict, model_state_dict

EMBED = "model.embed_tokens.weight"


def split_layers(num_layers: int, stages: int) -> list:
    """[(start, end)] layer ranges of each stage: equal shares, the first `num_layers % stages` one larger."""
    if stages < 1 or num_layers < stages:
        raise MsLlmError(f"parallel.pipeline_stages={stages} needs at least one decoder layer per stage; the model "
                         f"has {num_layers} (model.num_hidden_layers)")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass
class PPGroup:
    size: int                       # pipeline stages
    stage: int                      # this rank's stage
    start: int                      # first layer it holds
    end: int                        # one past its last layer
    group: Optional[str] = None     # all stages of this replica (None: the world group)
    prev: Optional[str] = None      # link to stage - 1 (a two-rank group, or the world when it has two ranks)
    next: Optional[str] = None      # link to stage + 1
    embed: Optional[str] = None     # first + last stage, which share a tied embedding

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1

    @staticmethod
    def all_reduce(group: Optional[str]):
        return ops.AllReduce(ops.ReduceOp.SUM, group=group) if group else ops.AllReduce(ops.ReduceOp.SUM)


class LayerSlice(nn.CellList):
    """Layers `start` ... of the whole stack, named by their index in the whole model."""

    def __init__(self, start: int, layers):
        super().__init__()
        for i, layer in enumerate(layers):
            self.insert_child_to_cell(str(start + i), layer)

    def __getitem__(self, index):
        if isinstance(index, int):
            return list(self._cells.values())[index]
        return super().__getitem__(index)


class _StageBody(nn.Cell):
    """The `model.` part of a stage: its share of embedding, layers and final norm."""

    def __init__(self, cfg, start: int, end: int, embed: bool, norm: bool):
        super().__init__()
        if embed:
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.layers = LayerSlice(start, [DecoderLayer(cfg) for _ in range(start, end)])
        if norm:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class StageModel(CausalLM):
    """One pipeline stage. `stage_forward(x, *extra)` maps the stage's input (token ids on stage 0, hidden
    states [B, S, H] elsewhere) to its output (hidden states, final-normed on the last stage); `logits` (last
    stage) is the whole model's. `whole_shapes` is the whole model's {name: shape}, for gathers."""

    def __init__(self, config, pp: PPGroup, whole_shapes: dict):
        nn.Cell.__init__(self)
        self.config, self.pp, self.tp = config, pp, None
        self.first, self.last = pp.first, pp.last
        self.tied = config.tie_word_embeddings
        self.model = _StageBody(config, pp.start, pp.end, self.first or (self.last and self.tied), self.last)
        if self.last and not self.tied:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, DTYPES[config.compute_dtype],
                                  config.initializer_range, head=True)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.num_layers = pp.end - pp.start
        scaling = config.rope_scaling or {}
        self.dynamic_rope = scaling.get("rope_type", scaling.get("type")) == "dynamic"
        self.inv_freq = ms.Tensor(F.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
        self.choose_head_backends()
        self.neftune_alpha = 0.0
        self.set_multipliers(config.embedding_multiplier, config.logit_multiplier)
        self.whole_shapes = dict(whole_shapes)
        mine = [n for n, _ in self.parameters_and_names()]
        # the tied copy on the last stage is counted (norm) and written (checkpoints) by stage 0 only
        self.owned_names = tuple(n for n in mine if not (n == EMBED and not self.first))

    def construct(self, x, position_ids=None, segment_ids=None):
        return self.stage_forward(x, position_ids, segment_ids)

    def stage_forward(self, x, position_ids=None, segment_ids=None):
        b, s = x.shape[0], x.shape[1]
        mask, cos, sin = self.attention_inputs(b, s, None, position_ids, segment_ids)
        if self.first:
            x = self.embed(x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        if self.last:
            x = self.model.norm(x)
        return x

    def select(self, whole: dict) -> dict:
        """This stage's entries of a whole-model {name: array}."""
        mine = {n for n, _ in self.parameters_and_names()}
        return {n: a for n, a in whole.items() if n in mine}


def check_config(cfg, stages: int):
    """Raise naming the field when the model cannot be cut into `stages` stages."""
    split_layers(cfg.num_hidden_layers, stages)


class _GatherStages(nn.Cell):
    """Whole tensors from every stage: each name is summed over the pipeline group, the owning stage giving
    its values and the others zeros. (name, shape) pairs fix the layout at build time; call with this stage's
    owned tensors in that order. A collective: every stage calls it together."""

    def __init__(self, shapes, local_index, group):
        super().__init__(auto_prefix=False)
        self.shapes, self.local_index = tuple(shapes), tuple(local_index)
        self.all_reduce = PPGroup.all_reduce(group)

    def construct(self, *tensors):
        out = ()
        prev = None
        for i in range(len(self.shapes)):
            j = self.local_index[i]
            x = ops.zeros(self.shapes[i], ms.float32) if j < 0 else tensors[j].astype(ms.float32) * 1.0
            if prev is not None:                  # one collective after another, same order on every rank
                x = ops.depend(x, prev)
            prev = self.all_reduce(x)
            out = out + (prev,)
        return out


_GATHERS = {}


def gather_stages(named: dict, layout: dict, owned, pp: PPGroup) -> dict:
    """{name: whole numpy array} for every name of `layout` ({name: shape}, the same on every stage), from
    this stage's {name: tensor}; only names in `owned` are contributed. Collective over the pipeline group."""
    names = list(layout)
    owned = [n for n in names if n in owned and n in named]
    index = {n: i for i, n in enumerate(owned)}
    key = (tuple(names), tuple(owned), pp.stage, pp.group)
    if key not in _GATHERS:                 # compiled once per layout
        _GATHERS[key] = _GatherStages([tuple(layout[n]) for n in names], [index.get(n, -1) for n in names], pp.group)
    full = _GATHERS[key](*[named[n] for n in owned])
    return {n: t.asnumpy() for n, t in zip(names, full)}


def gather_weights(model: StageModel) -> dict:
    """The whole model's {name: array} on every stage (for checkpoints and final/)."""
    return gather_stages(dict(model.parameters_and_names()), model.whole_shapes, set(model.owned_names), model.pp)


def gather_optimizer_state(state: dict, model: StageModel) -> dict:
    """The whole optimizer state: every stage's Adam moments gathered; the step count and loss-scale values,
    the same on every stage, are taken from this one."""
    layout, owned = {}, set()
    for prefix in ("adam_m", "adam_v"):
        layout.update({f"{prefix}.{n}": s for n, s in model.whole_shapes.items()})
        owned.update(f"{prefix}.{n}" for n in model.owned_names)
    out = {k: v for k, v in state.items() if k not in layout}
    out.update(gather_stages(state, layout, owned, model.pp))
    return out


def build_stage(whole: CausalLM, pp: PPGroup) -> StageModel:
    """This rank's stage of a whole model, with the whole model's values."""
    state = model_state_dict(whole)
    stage = StageModel(whole.config, pp, {n: a.shape for n, a in state.items()})
    load_state_dict(stage, stage.select(state), strict=True, source=f"pipeline stage {pp.stage}")
    return stage


def stage_memory(model: StageModel) -> dict:
    """Parameters held by this stage vs the whole model (for logs and the run summary)."""
    mine = sum(int(p.size) for p in model.get_parameters())
    whole = sum(int(np.prod(s)) for s in model.whole_shapes.values())
    return {"stage": model.pp.stage, "layers": [model.pp.start, model.pp.end], "parameters": mine,
            "whole_parameters": whole}
