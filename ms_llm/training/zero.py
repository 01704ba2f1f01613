# SPDX-License-Identifier: Apache-2.0
"""ZeRO stage 3 over MindSpore collectives (`parallel.optimizer_shard: zero3`).

Every data-parallel rank holds 1/N of each trained matrix, flattened and zero-padded to N equal parts: a
float32 Parameter of ceil(n / N) elements that keeps the whole matrix's name. Its gradient, its accumulation
buffer and its Adam moments are that size too, so the optimizer runs unsharded on the shards.

    zero = ZeroGroup(rank, world)
    params = zero.shard(loss_net, params)     # the Updater does this; the model now reads gathered weights

A cell that reads a weight (Linear, Embedding, a LoRA factor) reads it through `read_weight(after)`: for a
sharded weight a `GatherWeight` cell all-gathers it (in the dtype its matmul reads) just before use, and
its backward reduce-scatters the whole gradient into the rank's shard (on CPU, where ReduceScatter does not
run, an AllReduce and a slice: the same sum). The gathered matrix lives only as long as its matmul (and
under `parallel.recompute` it is gathered again in the backward pass), so no rank holds the whole model.

Collectives must be issued in the same order on every rank. `after` fixes it: the gather waits for that
tensor (the layer's input, or the output of the sibling projection before it), and its backward returns a
zero gradient for `after` that waits for the reduce-scatter, so the reduce-scatters run in the reverse
order of the gathers. Vectors (norm weights, biases) stay whole on every rank and are all-reduced with the
loss numerator after the backward pass (`ShardedReducer`).

Generation cannot gather: each rank decodes its own rows, a different number of steps. Within
`replicated()` every sharded cell reads a whole copy of its matrix instead, gathered once on entry (one
collective per matrix, in the same order on every rank) into a Parameter the group keeps for the run, so the
ranks then run the model on their own (rollouts, scoring, evaluations) with no collective at all.

Checkpoints hold whole tensors: `whole_values` gathers one tensor at a time into host memory, and loading
slices whole tensors again (`local_value`), so a run resumes on any number of ranks.
"""
import contextlib
import gc
import math
import weakref

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.api import _cell_graph_executor

from ms_llm.models.shards import local_value, shape_of, whole_shape  # noqa: F401  (re-exported)
from ms_llm.training.collective import ordered_all_reduce


class GatherWeight(nn.Cell):
    """shard [k] (float32) -> the whole [*shape] matrix in `dtype`; backward: the summed gradient's own part."""

    def __init__(self, shape, rank: int, world: int, dtype, ascend: bool):
        super().__init__(auto_prefix=False)
        self.shape, self.size = tuple(shape), int(np.prod(shape))
        self.k = math.ceil(self.size / world)
        self.pad = self.k * world - self.size
        self.lo, self.hi = rank * self.k, (rank + 1) * self.k
        self.dtype = dtype
        self.all_gather = ops.AllGather()
        self.cast = ops.Cast()
        self.zeros_like = ops.ZerosLike()
        # ReduceScatter does not run on MindSpore's CPU backend: AllReduce and keep this rank's slice
        self.reduce_scatter = ops.ReduceScatter(ops.ReduceOp.SUM) if ascend else None
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)
        self.padding = Tensor(np.zeros(max(self.pad, 1), np.float32))

    def construct(self, shard, after):
        whole = self.all_gather(self.cast(ops.depend(shard, after), self.dtype))
        return whole[:self.size].reshape(self.shape)

    def bprop(self, shard, after, out, dout):
        g = self.cast(dout, ms.float32).reshape((self.size,))
        if self.pad:
            g = ops.concat((g, self.padding[:self.pad]))
        if self.reduce_scatter is not None:
            part = self.reduce_scatter(g)
        else:
            part = self.all_reduce(g)[self.lo:self.hi]
        return part, ops.depend(self.zeros_like(after), part)


class ShardedReducer(nn.Cell):
    """The data-parallel sum of a train step whose gradients are partly ZeRO-3 shards (summed already by their
    reduce-scatters): the loss numerator and denominator, then the whole (replicated) gradients, in tuple order,
    after every gradient of the backward pass exists. `sharded`: one bool per gradient."""

    def __init__(self, sharded, base):
        super().__init__(auto_prefix=False)
        self.sharded = tuple(bool(s) for s in sharded)
        self.rep_index = tuple(sum(1 for s in self.sharded[:i] if not s) for i in range(len(self.sharded)))
        self.all_reduce = base.all_reduce
        self.base = base

    def construct(self, grads, num, den):
        num = ops.depend(num, grads)              # the backward's reduce-scatters first, on every rank alike
        num, den = ordered_all_reduce(self.all_reduce, (num, den))
        rep = ()
        for i in range(len(self.sharded)):
            if not self.sharded[i]:
                rep = rep + (grads[i],)
        rep = self.base.sum_gradients(rep, den)
        out = ()
        for i in range(len(self.sharded)):
            if self.sharded[i]:
                out = out + (grads[i],)
            else:
                out = out + (rep[self.rep_index[i]],)
        return out, num, den

    def host_sum(self, values: np.ndarray) -> np.ndarray:
        return self.base.host_sum(values)


def drop_compiled_graphs():
    """Forget every graph this process compiled. A compiled graph reads the Parameters it was compiled against,
    so one compiled before `shard` (an evaluation before training, a reference scorer, a decode step, a monitor's
    baseline) would go on reading the whole weights without gathering them — on one rank only, where the other
    ranks gather: wrong values, then a hang. Sharding and unsharding therefore drop them all; each cell compiles
    again at its next call, against the Parameters it holds then."""
    for obj in gc.get_objects():
        if isinstance(obj, weakref.ProxyTypes):       # (isinstance on a dead proxy raises ReferenceError)
            continue
        if isinstance(obj, nn.Cell) and getattr(obj, "_compile_cache", None):
            _cell_graph_executor.del_net_res(obj, obj.compile_cache)
            obj.compile_cache.clear()


class ZeroGroup:
    """ZeRO-3 over the data-parallel ranks (all of the job's ranks: it does not combine with tensor or pipeline
    parallelism). Remembers every cell whose weight it sharded, so `unshard` can give them back whole."""

    def __init__(self, rank: int, world: int, ascend: bool = False):
        self.rank, self.world, self.ascend = rank, world, ascend
        self.cells = []                 # cells whose `weight` is a shard
        self.released = False           # after `unshard`: rank 0 holds whole weights, the others nothing to gather
        self._all_gather = None
        self._copies = {}               # id(shard) -> the whole copy replicated() reads (kept for the run)

    def shard(self, net, params) -> list:
        """Shard every matrix among `params` that a weight-reading cell under `net` holds; returns `params` with
        those replaced by their shards (same order). Graphs compiled before are dropped (drop_compiled_graphs)."""
        wanted = {id(p) for p in params}
        drop_compiled_graphs()
        self.released = False           # (a second training in the same process: the next SFT phase)
        self._copies = {}
        swapped = {}
        for _, cell in net.cells_and_names():
            p = getattr(cell, "weight", None) if hasattr(cell, "read_weight") else None
            if p is None or id(p) not in wanted:
                continue
            if id(p) not in swapped and (len(p.shape) < 2 or p.dtype != ms.float32):
                continue
            if id(p) not in swapped:
                swapped[id(p)] = self._shard_param(p)
            self._attach(cell, p, swapped[id(p)])
        return [swapped.get(id(p), p) for p in params]

    def _shard_param(self, p) -> Parameter:
        value = p.asnumpy()
        k = math.ceil(value.size / self.world)
        flat = np.zeros(k * self.world, np.float32)
        flat[:value.size] = value.reshape(-1)
        shard = Parameter(Tensor(flat[self.rank * k:(self.rank + 1) * k]), name=p.name, requires_grad=True)
        shard.zero_whole_shape, shard.zero_place = tuple(p.shape), (self.rank, self.world)
        return shard

    def _attach(self, cell, whole, shard):
        name = whole.name
        dtype = getattr(cell, "gather_dtype", lambda: ms.float32)()
        cell.weight = shard
        shard.name = name                                   # attaching renames it locally
        cell.zero = GatherWeight(shard.zero_whole_shape, self.rank, self.world, dtype, self.ascend)
        self.cells.append(cell)

    def gather_host(self, param) -> np.ndarray:
        """The whole float32 matrix of a shard, in host memory (a collective: every rank calls it, same order)."""
        if self._all_gather is None:
            self._all_gather = ops.AllGather()
        whole = self._all_gather(param.value()).asnumpy()
        return whole[:int(np.prod(param.zero_whole_shape))].reshape(param.zero_whole_shape)

    @contextlib.contextmanager
    def replicated(self):
        """Within: every sharded cell reads a whole copy of its matrix, in the dtype its product reads, and the
        model runs without collectives (generation, scoring, evaluation), each rank on its own. Entering is a
        collective (every rank, same order). The copies are Parameters kept for the run and refreshed from the
        shards on every entry, so what was compiled within reads the current weights the next time.

        A graph keeps reading the Parameters it was compiled against: a cell compiled within reads the copies,
        one compiled outside gathers. So each top-level cell must run in one mode only — generation and scoring
        within, the train step outside; a rollout source refuses a policy that gathers. After `unshard` (rank 0 holds
        whole weights) this does nothing."""
        swaps, fresh = [], set()
        for cell in self.cells:
            shard = cell.weight
            if id(shard) not in fresh:                    # (a tied embedding: two cells, one shard)
                self._refresh(shard, cell.zero.dtype)
                fresh.add(id(shard))
            swaps.append((cell, shard, cell.zero))
        for cell, shard, gather in swaps:                 # only after every gather: a failure swaps nothing
            name = shard.name
            cell.zero = None
            cell.weight = self._copies[id(shard)]
            cell.weight.name = name
        try:
            yield
        finally:
            for cell, shard, gather in swaps:
                name = shard.name
                cell.weight = shard
                shard.name = name
                cell.zero = gather

    def _refresh(self, shard, dtype):
        """The whole copy of `shard` (a collective), gathered on the device in `dtype` (on CPU in float32, which
        MindSpore's CPU collectives carry, then cast)."""
        if self._all_gather is None:
            self._all_gather = ops.AllGather()
        wire = dtype if self.ascend else ms.float32
        whole = self._all_gather(ops.cast(shard.value(), wire))
        shape = shard.zero_whole_shape
        whole = whole[:int(np.prod(shape))].reshape(shape)
        whole = whole if whole.dtype == dtype else ops.cast(whole, dtype)
        copy = self._copies.get(id(shard))
        if copy is None:
            self._copies[id(shard)] = Parameter(whole, name=shard.name, requires_grad=False)
        else:
            copy.set_data(whole)

    def whole_values(self, named: dict) -> dict:
        """{name: array} of `named` ({name: Parameter or array}) with every shard gathered whole, one tensor at
        a time (a collective). Half-precision values are widened to float32 as models/io.model_state_dict does.
        Only rank 0, which writes checkpoints and exports, keeps them: the other ranks return {}."""
        out = {}
        if self.released and self.rank:
            return out
        for name, p in named.items():
            if isinstance(p, Parameter) and whole_shape(p) is not None:
                value = self.gather_host(p)
            elif self.rank == 0:
                value = p.asnumpy() if hasattr(p, "asnumpy") else np.asarray(p)
                value = value if value.dtype == np.float32 or value.dtype.kind != "f" else value.astype(np.float32)
            if self.rank == 0:
                out[name] = value
        return out

    def unshard(self):
        """After training (a collective): rank 0's sharded cells get their whole weights back, for the stage's
        exports, merges and evaluations; the other ranks, which export nothing, keep their shards (and must
        not run the model again). Graphs compiled before keep reading the shards."""
        done = {}
        for cell in self.cells:
            p = cell.weight
            if id(p) not in done:
                whole = self.gather_host(p)
                done[id(p)] = None if self.rank else Parameter(Tensor(whole), name=p.name, requires_grad=p.requires_grad)
            if self.rank == 0:
                name = p.name
                cell.weight = done[id(p)]
                cell.weight.name = name
                cell.zero = None
        if self.rank == 0:
            drop_compiled_graphs()      # (what was compiled gathers: rank 0 now runs alone, on whole weights)
        self.cells, self.released = [], True
