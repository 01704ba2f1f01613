# SPDX-License-Identifier: Apache-2.0
"""One-step off-policy rollouts on msrun ranks of their own (`grpo.async_rollout.rollout_ranks: R`).

    ms-llm launch configs/tiny/grpo.yaml grpo.async_rollout.enabled=true grpo.async_rollout.rollout_ranks=1 \
        --nproc-per-node 3          # ranks 0-1 train in data parallel, rank 2 generates

The job's last R ranks generate; the first T train, as data-parallel ranks of their own group ("trainers", where
their gradients, the resume step and the rollout exchanges are summed). Trainer 0 and the rollout ranks form a
second group ("rollout_link"), over which the trainer side of the one-process design (rollout/async_worker.py:
publish, submit, result) runs with collectives instead of files and pipes:

- a request (the step's prompts, seed and sampling settings) and, when they changed, the trainable weights go
  from trainer 0 to every rollout rank;
- rollout rank i generates its contiguous share of the rows, each row seeded by its index in the whole batch, so
  the tokens are those one process would sample;
- the shares come back to trainer 0 in row order, and trainer 0 hands the batch to the other trainers.

So while the trainers run step t, the rollout ranks generate step t + 1's completions with the weights the
trainers had before step t's update (the Asynchronous source, rollout/sources.py, decides what is asked when,
and what a checkpoint holds). Every transfer is an AllReduce(sum) in which the sender contributes the values
and the others zeros (training/collective.py): MindSpore's CPU Broadcast and AllGather take only the world
group, and its CPU AllReduce sums float32 only, so bytes travel two to a float32 value, exactly.
"""
import logging
import time

import mindspore as ms
import numpy as np
from mindspore import ops

from ms_llm.errors import MsLlmError
from ms_llm.generation import generate
from ms_llm.training.collective import sum_gather_objects, sum_send_object

log = logging.getLogger(__name__)
TRAINERS, LINK = "trainers", "rollout_link"


class Link:
    """Trainer rank 0 (member 0) and the rollout ranks (members 1 ..), over one MindSpore group."""

    def __init__(self, members: list, rank: int, group: str = LINK):
        self.members, self.rank, self.group = list(members), rank, group
        self.index = self.members.index(rank)
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, group=group)

    @property
    def root(self) -> bool:
        return self.index == 0

    def _sum(self, values: np.ndarray) -> np.ndarray:
        return self.all_reduce(ms.Tensor(np.ascontiguousarray(values, np.float32))).asnumpy()

    def send_object(self, obj=None):
        """Member 0's `obj` on every member (the others pass nothing)."""
        return sum_send_object(self._sum, obj, self.root)

    def gather_objects(self, obj=None) -> list:
        """The rollout members' objects, in member order (member 0 contributes nothing)."""
        return sum_gather_objects(self._sum, obj, self.index, len(self.members))[1:]

    def send_arrays(self, arrays: list = None, like: list = None) -> list:
        """Member 0's float32 arrays on every member; the others pass `like`, arrays of the same shapes."""
        out = []
        for x in (arrays if self.root else like):
            x = np.asarray(x, np.float32)
            got = self._sum(x if self.root else np.zeros(x.shape, np.float32))
            out.append(x if self.root else got.reshape(x.shape))
        return out


def share(n: int, index: int, count: int) -> range:
    """Rollout rank `index`'s contiguous rows of n (the first n mod count ranks take one more)."""
    return range(n * index // count, n * (index + 1) // count)


class RankWorker:
    """The trainer side: RolloutWorker's interface over the Link. Trainer 0 talks to the rollout ranks; `result`
    hands the batch to every trainer (each runs the same source and calls the same methods in the same order)."""

    def __init__(self, layout, sampling: dict):
        self.layout, self.link, self.sampling = layout, layout.link, sampling
        self.pending, self.params, self.sent, self.peeked = False, None, None, None

    def publish(self, params, version: int) -> str:
        """Keep `params` (a callable returning {name: array}): trainer 0 reads them when it sends a new version."""
        self.params = params
        return f"version {version}"

    def submit(self, version: int, weights: str, rows: list, seed, max_new_tokens: int, cache_len: int,
               prompt_width: int):
        if self.layout.rank == 0:
            arrays = self.params() if version != self.sent else None
            names = sorted(arrays) if arrays is not None else None
            self.link.send_object({"version": version, "rows": rows, "seed": seed, "max_new_tokens": max_new_tokens,
                                   "cache_len": cache_len, "prompt_width": prompt_width, "sampling": self.sampling,
                                   "weights": None if names is None else [(n, tuple(arrays[n].shape)) for n in names]})
            if names is not None:
                self.link.send_arrays([arrays[n] for n in names])
                self.sent = version
        self.pending = True

    def peek(self) -> dict:
        """Trainer 0 at a checkpoint: the batch in flight, waited for and kept for the next `result`."""
        if self.peeked is None:
            tic = time.perf_counter()
            self.peeked = merge(self.link.gather_objects(), self.sampling.get("pad_token_id", 0))
            self.peeked["wait_s"] = time.perf_counter() - tic
        return self.peeked

    @property
    def has_batch(self) -> bool:
        return self.pending or self.peeked is not None

    def result(self) -> dict:
        """The batch, on every trainer (all call it at the same point: a collective among them)."""
        got = None
        if self.layout.rank == 0:
            got = self.peek()
            self.peeked = None
        if self.layout.world > 1:                   # trainer 0's batch to the others (a sum over their group)
            got = sum_send_object(self.layout.world_sum, got, self.layout.rank == 0)
        self.pending = False
        return got

    def close(self, wait: bool = True):
        """Tell the rollout ranks to stop (trainer 0; not after a failure, when they may be mid-exchange: msrun
        ends the job then)."""
        if wait and self.layout.rank == 0:
            if self.pending:
                self.result()
            self.link.send_object(None)


def merge(parts: list, pad: int) -> dict:
    """The rollout ranks' shares ({rows, tokens, logprobs, lengths, finished, version, generate_s}) as one batch
    in row order, narrower token arrays padded as generation pads a finished row."""
    parts = [p for p in parts if p["rows"]]
    width = max(p["tokens"].shape[1] for p in parts)

    def pad_to(a, value):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)
    return {"tokens": np.concatenate([pad_to(p["tokens"], pad) for p in parts]),
            "logprobs": np.concatenate([pad_to(p["logprobs"], 0.0) for p in parts]),
            "lengths": np.concatenate([p["lengths"] for p in parts]),
            "finished": np.concatenate([p["finished"] for p in parts]),
            "version": parts[0]["version"], "generate_s": max(p["generate_s"] for p in parts)}


def serve(policy, layout):
    """A rollout rank: answer trainer 0's requests with its share of the rows until told to stop."""
    link = layout.link
    params = {p.name: p for p in policy.trainable_params()}
    names = sorted(params)
    index, count = link.index - 1, len(link.members) - 1
    served = 0
    while True:
        msg = link.send_object()
        if msg is None:
            log.info("rollout rank %d: stopped after %d batches", layout.rank, served)
            return
        if msg["weights"] is not None:
            mine = [(n, tuple(params[n].shape)) for n in names]
            if [(n, tuple(s)) for n, s in msg["weights"]] != mine:
                wrong = sorted(set(map(str, msg["weights"])) ^ set(map(str, mine)))[:4]
                raise MsLlmError(f"rollout rank {layout.rank}: the trainers' trainable parameters are not this "
                                 f"rank's policy's (names or shapes differ: {wrong}); both build the policy from the "
                                 "same config")
            arrays = link.send_arrays(like=[np.zeros(params[n].shape, np.float32) for n in names])
            for name, arr in zip(names, arrays):
                params[name].set_data(ms.Tensor(arr, params[name].dtype))
        rows = share(len(msg["rows"]), index, count)
        out = {"rows": list(rows), "version": msg["version"], "generate_s": 0.0}
        if len(rows):
            tic = time.perf_counter()
            got = generate(policy, msg["rows"][rows.start:rows.stop], msg["max_new_tokens"], seed=msg["seed"],
                           cache_len=msg["cache_len"], prompt_width=msg["prompt_width"], rows=rows, **msg["sampling"])
            out.update(tokens=got.tokens, logprobs=got.logprobs, lengths=got.lengths,
                       finished=got.state.finished.copy(), generate_s=time.perf_counter() - tic)
        link.gather_objects(out)
        served += 1
