# SPDX-License-Identifier: Apache-2.0
"""Training under msrun: process groups (data and tensor parallel), the gradient reducer, worker status files.

Each msrun worker runs `launch.worker_main` (scripts/train.py). Gradients, loss numerators and denominators are
summed over ranks with AllReduce inside the train-step graph (see training/step.py), so N ranks with
micro-batch B train exactly like one process with micro-batch N x B. Every worker writes
`<log_dir>/rank_<r>.status` ("running", then "completed" or "failed: ..."), which is how the launcher
names the rank that died when a job fails.
"""
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.communication import create_group, get_group_size, get_rank, init

from ms_llm.errors import MsLlmError
from ms_llm.models.config import preset
from ms_llm.models.io import read_config, resolve_model_dir
from ms_llm.models.pipeline import PPGroup, split_layers
from ms_llm.models.tensor_parallel import TPGroup
from ms_llm.rollout.rollout_ranks import LINK, TRAINERS, Link
from ms_llm.training.collective import bucket_plan, bucketed_all_reduce, ordered_all_reduce
from ms_llm.training.layout import Layout, rollout_ranks
from ms_llm.training.zero import ZeroGroup


class SumReducer(nn.Cell):
    """AllReduce(sum) of the loss numerator and denominator and of the gradient tuple, in that order on every
    rank (training/collective.py), over `group` (the data-parallel ranks; default all). The layout's reducer
    sums one tensor at a time; `for_gradients(params)` gives a train step its own, which sums that step's
    gradients in buckets of `bucket_mb` (parallel.bucket_mb; 0: one tensor at a time)."""

    def __init__(self, group: str = None, bucket_mb: float = 0.0, plan=None):
        super().__init__(auto_prefix=False)
        self.group, self.bucket_mb = group, bucket_mb
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, group=group) if group else ops.AllReduce(ops.ReduceOp.SUM)
        self.plan, self.where = plan if plan is not None else (None, None)

    def for_gradients(self, params) -> "SumReducer":
        """A reducer of the gradients of `params` (in that order) in buckets; itself when buckets are off."""
        if self.bucket_mb <= 0:
            return self
        plan = bucket_plan([tuple(p.shape) for p in params], [ms.dtype_to_nptype(p.dtype) for p in params],
                           int(self.bucket_mb * 2 ** 20))
        return SumReducer(self.group, self.bucket_mb, plan)

    def construct(self, grads, num, den):
        num, den = ordered_all_reduce(self.all_reduce, (num, den))
        return self.sum_gradients(grads, den), num, den

    def sum_gradients(self, grads, after):
        """The gradients summed over the ranks (in buckets when planned), the first collective after `after`."""
        if self.plan is None:
            return ordered_all_reduce(self.all_reduce, grads, after)
        return bucketed_all_reduce(self.all_reduce, grads, self.plan, self.where, after)

    def host_sum(self, values: np.ndarray) -> np.ndarray:
        """AllReduce(sum) of a small host array (float32) over the same ranks: a statistic a step needs before
        its update, e.g. KTO's reference point over the global batch."""
        return self.all_reduce(ms.Tensor(np.asarray(values, np.float32))).asnumpy()


def launched_by_msrun() -> bool:
    return "MS_WORKER_NUM" in os.environ and "MS_ROLE" in os.environ


def init_layout(cfg) -> Layout:
    """This process's Layout (rank, world, reducer, tp, pp).

    world = parallel.data_parallel x tensor_parallel x pipeline_stages (at most one of the last two above 1).
    Ranks r·n ... r·n + n − 1 form tensor-parallel group r (`tp`, a TPGroup, or None) or pipeline r (`pp`, a
    PPGroup, or None), n being the group's size; ranks with the same position in their group form a
    data-parallel group, over which `reducer` sums gradients."""
    dp, tpn, ppn = cfg.parallel.data_parallel, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_stages
    want = dp * tpn * ppn
    generators = rollout_ranks(cfg)
    if not launched_by_msrun():
        if want + generators != 1:
            raise MsLlmError(f"parallel.data_parallel x tensor_parallel x pipeline_stages is {want}"
                             + (f" (+ {generators} rollout ranks)" if generators else "") + " but this process was "
                             f"not started by msrun; use `ms-llm launch --nproc-per-node {want + generators} CONFIG`")
        return Layout()
    init()
    rank, world = get_rank(), get_group_size()
    if generators:
        return _rollout_layout(rank, world, dp, generators, cfg.parallel.bucket_mb)
    if world != want:
        raise MsLlmError(f"parallel.data_parallel ({dp}) x tensor_parallel ({tpn}) x pipeline_stages ({ppn}) is "
                         f"{want} but msrun started {world} workers")
    if ppn > 1:
        pp, dp_group = _pipeline_groups(cfg, rank, dp, ppn, create_group)
        return Layout(rank, world, SumReducer(dp_group, cfg.parallel.bucket_mb) if dp > 1 else None, pp=pp)
    tp, dp_group = _tensor_parallel_groups(rank, tpn, dp)
    zero = None
    if cfg.parallel.optimizer_shard == "zero3":        # (validated: data parallel only)
        zero = ZeroGroup(rank, world, ascend=cfg.context.device_target == "ascend")
    return Layout(rank, world, SumReducer(dp_group, cfg.parallel.bucket_mb) if dp > 1 else None, tp=tp, zero=zero)


def _rollout_layout(rank: int, world: int, trainers: int, generators: int, bucket_mb: float) -> Layout:
    """Ranks 0 .. trainers − 1 train in data parallel over their own group; the last `generators` ranks generate.
    Trainer 0 and the generating ranks form the rollout link (rollout/rollout_ranks.py)."""
    if world != trainers + generators:
        raise MsLlmError(f"parallel.data_parallel ({trainers}) trainer ranks + grpo.async_rollout.rollout_ranks "
                         f"({generators}) is {trainers + generators}, but msrun started {world} workers")
    members = [0] + list(range(trainers, world))
    if rank in members:
        create_group(LINK, members)
    link = Link(members, rank) if rank in members else None
    if rank >= trainers:
        return Layout(rank, world, link=link, role="rollout")
    if trainers == 1:
        return Layout(rank, 1, link=link)
    create_group(TRAINERS, list(range(trainers)))
    return Layout(rank, trainers, SumReducer(TRAINERS, bucket_mb), group=TRAINERS, link=link)


def _tensor_parallel_groups(rank: int, tpn: int, dp: int, data_groups: bool = True) -> tuple:
    """(TPGroup or None, data-parallel group name or None) of `rank`: tensor-parallel group rank // tpn, at its
    position rank % tpn. Only the groups this rank belongs to are created; one spanning the world is the world
    group. data_groups=False: no data-parallel groups (nothing is summed across the tensor-parallel groups)."""
    if tpn <= 1:
        return None, None
    index, pos = divmod(rank, tpn)
    group = dp_group = None
    if dp > 1:                           # the whole world is one tensor-parallel group when dp == 1
        group = f"tp_{index}"
        create_group(group, [index * tpn + i for i in range(tpn)])
        if data_groups:
            dp_group = f"dp_{pos}"
            create_group(dp_group, [d * tpn + pos for d in range(dp)])
    return TPGroup(tpn, pos, group), dp_group


def init_model_groups(tensor_parallel: int, what: str) -> Layout:
    """A job that runs a frozen model (no training) under msrun: the ranks form world / tensor_parallel groups
    of `tensor_parallel` ranks, each holding the model split across it; Layout.data_rank / data_world are the
    group's index and the number of groups (each takes its share of the work). One process: Layout()."""
    if not launched_by_msrun():
        if tensor_parallel > 1:
            raise MsLlmError(f"{what}: tensor parallel over {tensor_parallel} ranks needs msrun workers; run it with "
                             f"--nproc-per-node (a multiple of {tensor_parallel})")
        return Layout()
    init()
    rank, world = get_rank(), get_group_size()
    if world % tensor_parallel:
        raise MsLlmError(f"{what}: {world} workers do not split into groups of {tensor_parallel} ranks")
    tp, _ = _tensor_parallel_groups(rank, tensor_parallel, world // tensor_parallel, data_groups=False)
    return Layout(rank, world, tp=tp)


def _pipeline_groups(cfg, rank: int, dp: int, stages: int, create_group):
    """(PPGroup, data-parallel group name) of `rank`: stage rank % stages of pipeline rank // stages. Only
    the groups this rank belongs to are created; a group spanning the whole world is the world group."""
    m = cfg.model
    shape = read_config(resolve_model_dir(m.init_from)) if m.init_from else preset(m.preset, **m.overrides)
    index, stage = divmod(rank, stages)
    start, end = split_layers(shape.num_hidden_layers, stages)[stage]
    members = [index * stages + s for s in range(stages)]

    def group(name, ranks):
        if len(ranks) == dp * stages:
            return None
        if rank in ranks:
            create_group(name, ranks)
        return name

    whole = group(f"pp_{index}", members)
    links = [whole if stages == 2 else group(f"pp_{index}_{s}", members[s:s + 2]) for s in range(stages - 1)]
    embed = None
    if shape.tie_word_embeddings and stage in (0, stages - 1):
        embed = whole if stages == 2 else group(f"ppe_{index}", [members[0], members[-1]])
    pp = PPGroup(stages, stage, start, end, whole, links[stage - 1] if stage > 0 else None,
                 links[stage] if stage < stages - 1 else None, embed)
    dp_group = group(f"dpp_{stage}", [d * stages + stage for d in range(dp)]) if dp > 1 else None
    return pp, dp_group
