# SPDX-License-Identifier: Apache-2.0
"""Where one process sits in a run, and everything that depends on it.

    layout = Layout()                                   # one process
    layout = Layout(rank, world, reducer, tp=TPGroup)   # from distributed.init_data_parallel under msrun
    layout = Layout(rank, world, reducer, zero=ZeroGroup)   # ZeRO-3 (training/zero.py)

A stage receives a Layout and asks it, never the model, how the run is split: which batches this rank reads
(`data_rank`, `data_world`), how to cut a whole model into this rank's part (`localize`), which train-step
cell to use, and how to gather whole weights and optimizer state for a checkpoint (`whole_weights`,
`whole_optimizer_state`) or slice them again on resume (`local_optimizer_state`). Data parallelism and ZeRO-1
need nothing beyond the reducer; tensor parallelism (`tp`), pipeline stages (`pp`) and ZeRO-3 (`zero`: the
updaters shard what they train) are at most one at a time.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ms_llm.errors import MsLlmError


def rollout_ranks(cfg) -> int:
    """Ranks of the job that only generate (grpo.async_rollout.rollout_ranks), beside the training ranks."""
    a = cfg.grpo.async_rollout
    return a.rollout_ranks if cfg.stage == "grpo" and a.enabled else 0


@dataclass
class Layout:
    rank: int = 0
    world: int = 1
    reducer: Optional[object] = None        # data-parallel gradient reducer (distributed.SumReducer)
    tp: Optional[object] = None             # models.tensor_parallel.TPGroup
    pp: Optional[object] = None             # models.pipeline.PPGroup
    zero: Optional[object] = None           # training.zero.ZeroGroup (parallel.optimizer_shard: zero3)
    group: Optional[str] = None             # the ranks `world` counts, when not the job's (trainers beside rollout ranks)
    link: Optional[object] = None           # rollout.rollout_ranks.Link: trainer 0 and the rollout ranks
    role: str = "train"                     # "rollout": a rank that only generates (grpo.async_rollout.rollout_ranks)

    @property
    def main(self) -> bool:
        """Rank 0 writes metrics, checkpoints, final/ and summary.json."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """The tensor-parallel ranks of one group, and the stages of one pipeline, read the same batches."""
        group = self.tp or self.pp
        return self.rank // group.size if group is not None else self.rank

    @property
    def data_world(self) -> int:
        group = self.tp or self.pp
        return self.world // group.size if group is not None else self.world

    def replicated(self):
        """A context in which the model reads whole weights on every rank and runs without collectives: under
        ZeRO-3 whole copies gathered on entry (training/zero.py; a collective); otherwise nothing to do. What
        generates or scores each rank's own rows runs within it."""
        return self.zero.replicated() if self.zero is not None else contextlib.nullcontext()

    def world_sum(self, values) -> np.ndarray:
        """Sum of a small host array over every rank of the job (float32; itself in one process): how ranks
        agree on facts outside the train step (the resume step, what storage they see)."""
        values = np.asarray(values, np.float32)
        if self.world == 1:
            return values
        return self._group_sum(values)

    def _group_sum(self, values: np.ndarray) -> np.ndarray:
        """AllReduce(sum) of a float32 host array over this layout's ranks (`group`, else the world)."""
        # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
        import mindspore as ms
        from mindspore import ops
        op = ops.AllReduce(ops.ReduceOp.SUM, group=self.group) if self.group else ops.AllReduce(ops.ReduceOp.SUM)
        return op(ms.Tensor(np.asarray(values, np.float32))).asnumpy()

    def data_sum(self, values) -> np.ndarray:
        """Sum of a small host array over the data-parallel ranks (float32; itself in one process)."""
        values = np.asarray(values, np.float32)
        return values if self.reducer is None else self.reducer.host_sum(values)

    def share(self, n: int) -> slice:
        """This data-parallel rank's contiguous part of n items (rollout rows, groups): the first n mod W ranks
        take one more than the rest, rank order is item order."""
        w, r = self.data_world, self.data_rank
        return slice(n * r // w, n * (r + 1) // w)

    def gather_objects(self, obj) -> list:
        """Every data-parallel rank's `obj` (anything picklable), in rank order; [obj] in one process. Bytes
        travel as int32 through AllGather (MindSpore's CPU collectives have no int8 kernels), so arrays arrive
        bit for bit."""
        if self.data_world == 1:
            return [obj]
        if self.tp is not None or self.pp is not None:
            raise MsLlmError("gathering rollouts over data-parallel ranks with tensor or pipeline parallel is not "
                             "supported")
        if self.group is not None:       # (a group of some of the job's ranks: MindSpore's CPU AllGather takes none)
            # MindSpore-backed, as world_sum: Layout stays light for the CLI, which imports it through ms_llm.stages
            from ms_llm.training.collective import sum_gather_objects
            return sum_gather_objects(self._group_sum, obj, self.rank, self.world)
        # MindSpore-backed, as world_sum: Layout stays light for the CLI, which imports it through ms_llm.stages
        import pickle
        import mindspore as ms
        from mindspore import ops
        raw = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        gather = ops.AllGather()
        sizes = gather(ms.Tensor(np.array([raw.size], np.int32))).asnumpy()
        buf = np.zeros(-(-int(sizes.max()) // 4) * 4, np.uint8)
        buf[:raw.size] = raw
        got = gather(ms.Tensor(buf.view(np.int32))).asnumpy().view(np.uint8).reshape(self.world, -1)
        return [pickle.loads(got[r, :int(sizes[r])].tobytes()) for r in range(self.world)]

    def localize(self, model, source: str = "model"):
        """This rank's part of a whole CausalLM: its tensor-parallel slices or its pipeline stage."""
        if self.tp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models import CausalLM
            from ms_llm.models.io import load_state_dict, model_state_dict
            from ms_llm.models.tensor_parallel import shard_state
            whole = model_state_dict(model)
            model = CausalLM(model.config, self.tp)
            load_state_dict(model, shard_state(whole, self.tp), strict=True, source="tensor-parallel slices")
        if self.pp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.pipeline import build_stage, check_config
            try:
                check_config(model.config, self.pp.size)
            except MsLlmError as e:
                raise MsLlmError(f"{source}: {e}") from None
            model = build_stage(model, self.pp)
        return model

    def train_step(self, model, loss_net, optimizer, loss_scale, accum_steps: int, clip: float, loss_norm: float):
        """The step cell for this layout: the GPipe schedule over pipeline stages, else TrainStep (with the
        tensor-parallel gradient norm when layers are sliced)."""
        # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
        from ms_llm.training.step import TrainStep
        if self.pp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.training.pipeline import PipelineStep
            return PipelineStep(model, optimizer, loss_scale, clip, self.reducer, loss_norm)
        tp_norm, reducer = None, self.reducer
        if reducer is not None and self.zero is None:    # this step's gradients in buckets (parallel.bucket_mb)
            reducer = reducer.for_gradients(optimizer.parameters)
        if self.tp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.tensor_parallel import shard_axis
            from ms_llm.training.step import ShardedNorm
            names = {id(p): n for n, p in model.parameters_and_names()}
            tp_norm = ShardedNorm([shard_axis(names.get(id(p), p.name)) is not None for p in optimizer.parameters],
                                  self.tp.all_reduce())
        if self.zero is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.training.step import ShardedNorm
            from ms_llm.training.zero import ShardedReducer, whole_shape
            sharded = [whole_shape(p) is not None for p in optimizer.parameters]
            tp_norm = ShardedNorm(sharded, self.reducer.all_reduce)
            reducer = ShardedReducer(sharded, self.reducer.for_gradients(
                [p for p, s in zip(optimizer.parameters, sharded) if not s]))
        return TrainStep(loss_net, optimizer, loss_scale, accum_steps, clip, reducer, loss_norm=loss_norm,
                         tp_norm=tp_norm)

    def eval_loss_fn(self, loss_net, model):
        """What evaluates a batch's loss: the loss cell, or under pipeline stages a pass through all of them."""
        if self.pp is None:
            return loss_net
        # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
        from ms_llm.training.pipeline import PipelineLoss
        return PipelineLoss(model)

    def whole_weights(self, model, shards_only: bool = False) -> Optional[dict]:
        """{name: array} of the whole model when it is split (a collective: call it on every rank), else None.
        shards_only: under ZeRO-3, only the gathered shards (what a LoRA adapter's writer needs)."""
        if self.zero is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.io import named_parameters
            from ms_llm.models.shards import whole_shape
            named = named_parameters(model)
            if shards_only:
                named = {n: p for n, p in named.items() if whole_shape(p) is not None}
            return self.zero.whole_values(named)
        if self.pp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.pipeline import gather_weights
            return gather_weights(model)
        if self.tp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.tensor_parallel import gather_state
            return gather_state(dict(model.parameters_and_names()), self.tp)
        return None

    def whole_optimizer_state(self, state: dict, model) -> dict:
        """The whole optimizer state from every rank's share (a collective when the model is split)."""
        if self.zero is not None:
            return self.zero.whole_values(state)
        if self.pp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.pipeline import gather_optimizer_state
            return gather_optimizer_state(state, model)
        if self.tp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.tensor_parallel import gather_state
            return gather_state(state, self.tp)
        return state

    def local_optimizer_state(self, saved: dict) -> dict:
        """This rank's slices of a whole saved optimizer state (pipeline stages select by name on load)."""
        if self.tp is not None:
            # MindSpore-backed: Layout stays light, since the CLI imports it through ms_llm.stages
            from ms_llm.models.tensor_parallel import shard_state
            return shard_state(saved, self.tp)
        return saved
