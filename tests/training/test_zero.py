# SPDX-License-Identifier: Apache-2.0
"""ZeRO-3's pieces in one process (training/zero.py, models/shards.py): a shard's slice of a whole tensor and the
gradient norm over shards against NumPy, weight decay decided by the whole matrix's shape, and the config key's
values and refusals. The collectives themselves run in the msrun tests (tests/test_distributed.py, the SFT and
DPO stage tests), which compare 2 ranks with one process."""
import os

import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from ms_llm.config import load_config
from ms_llm.errors import MsLlmError
from ms_llm.models.shards import local_value, shape_of, whole_shape
from ms_llm.training.optim import AdamW
from ms_llm.training.step import ShardedNorm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shard(whole: np.ndarray, rank: int, world: int) -> Parameter:
    """A shard as ZeroGroup._shard_param makes it, built here by hand from NumPy."""
    k = -(-whole.size // world)
    flat = np.concatenate([whole.ravel(), np.zeros(k * world - whole.size, np.float32)])
    p = Parameter(Tensor(flat[rank * k:(rank + 1) * k].copy()), name="w")
    p.zero_whole_shape, p.zero_place = whole.shape, (rank, world)
    return p


@pytest.mark.parametrize("shape,world", [((5, 3), 2), ((4, 4), 2), ((7, 3), 4), ((2, 3), 8)])
def test_a_shard_is_its_ranks_part_of_the_padded_flat_matrix_and_the_parts_rebuild_it(shape, world):
    rng = np.random.default_rng(0)
    whole = rng.standard_normal(shape).astype(np.float32)
    parts = []
    for rank in range(world):
        p = _shard(np.zeros(shape, np.float32), rank, world)
        assert whole_shape(p) == shape and shape_of(p) == shape
        part = local_value(p, whole)
        assert part.shape == tuple(p.shape)
        parts.append(part)
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(flat[:whole.size].reshape(shape), whole)      # the parts rebuild it exactly
    assert not flat[whole.size:].any()                                            # and the padding is zero
    plain = Parameter(Tensor(np.zeros(shape, np.float32)), name="v")
    assert whole_shape(plain) is None and shape_of(plain) == shape
    assert local_value(plain, whole) is whole                                     # not a shard: untouched


class _Identity(nn.Cell):
    """The sum over one rank's group (the norm's all_reduce, in one process)."""

    def construct(self, x):
        return x


def test_gradient_norm_over_shards_counts_replicated_gradients_once():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((6,), (3,), (4, 2), (5,))]
    sharded = [True, False, False, True]
    norm = ShardedNorm(sharded, _Identity())(tuple(Tensor(g) for g in grads)).asnumpy()
    want = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    assert abs(float(norm) - want) <= 1e-6 * want
    only = ShardedNorm([True, True], _Identity())((Tensor(grads[0]), Tensor(grads[3]))).asnumpy()
    assert abs(float(only) - np.sqrt((grads[0] ** 2).sum() + (grads[3] ** 2).sum())) <= 1e-5


def test_weight_decay_follows_the_whole_matrix_not_the_shard():
    shard = _shard(np.zeros((4, 3), np.float32), 0, 2)            # a vector holding part of a matrix
    shard.name = "model.layers.0.mlp.up_proj.weight"
    norm = Parameter(Tensor(np.ones(3, np.float32)), name="model.norm.weight")
    opt = AdamW([shard, norm], weight_decay=0.1)
    assert [float(w.asnumpy()) for w in opt.wd] == [pytest.approx(0.1), 0.0]
    # and its moments are shards of the same whole, so a checkpoint stores them whole
    assert whole_shape(opt.m[0]) == (4, 3) and tuple(opt.m[0].shape) == (6,) and whole_shape(opt.m[1]) is None


def test_optimizer_shard_values_and_refusals(monkeypatch):
    monkeypatch.chdir(ROOT)
    for value, want in (("true", "zero1"), ("false", "none"), ("zero1", "zero1"), ("zero3", "zero3")):
        cfg = load_config("configs/tiny/pretrain.yaml", [f"parallel.optimizer_shard={value}",
                                                         "parallel.data_parallel=2"])
        assert cfg.parallel.optimizer_shard == want
    with pytest.raises(MsLlmError, match=r"parallel.optimizer_shard' = 'zero2' is not one of \['none', 'zero1', 'zero3'\]"):
        load_config("configs/tiny/pretrain.yaml", ["parallel.optimizer_shard=zero2"])
    with pytest.raises(MsLlmError, match="zero3 is supported by the pretrain, cpt, distill, sft, reward, dpo, grpo stages, not by stage 'ppo'"):
        load_config("configs/tiny/ppo.yaml", ["parallel.optimizer_shard=zero3", "parallel.data_parallel=2"])
    with pytest.raises(MsLlmError, match="needs parallel.data_parallel >= 2, got 1"):
        load_config("configs/tiny/sft_lora.yaml", ["parallel.optimizer_shard=zero3"])


def test_a_rollout_source_refuses_a_policy_that_gathers_its_weights(monkeypatch):
    """A ZeRO-3 matrix is all-gathered by every product, a collective, and each rank decodes its own rows, a
    different number of steps: a rollout source refuses such a policy before generating, naming the cell, and
    points to `layout.replicated()`. Without the gather (what `ZeroGroup.replicated` does while it runs) the same
    source collects its batch."""
    import mindspore as ms
    from ms_llm.generation import gathering_cell
    from ms_llm.models.config import preset
    from ms_llm.models.decoder import CausalLM
    from ms_llm.rollout.prompts import PromptStream
    from ms_llm.rollout.sources import rollout_source
    from ms_llm.training.zero import GatherWeight
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny/grpo.yaml", ["grpo.prompts_per_step=2", "grpo.group_size=2",
                                                 "grpo.max_new_tokens=3", "grpo.dynamic_sampling.enabled=false"],
                      check=False)
    model = CausalLM(preset("tiny"))
    prompts = [{"ids": [1, 2, 3], "prompt": "a", "answer": "x", "tag": "t"},
               {"ids": [4, 5], "prompt": "b", "answer": "y", "tag": "t"}]
    source = rollout_source(cfg, model, lambda texts, recs: {"total": np.arange(len(texts), dtype=float), "parts": {}},
                            lambda tok, n: "", PromptStream(prompts, 0), 0, ())
    cell = model.model.layers[1].mlp.down_proj
    cell.zero = GatherWeight(cell.weight.shape, 0, 2, ms.float32, False)
    assert gathering_cell(model) == "model.layers.1.mlp.down_proj"
    with pytest.raises(MsLlmError, match=r"layers.1.mlp.down_proj reads ZeRO-3 shards .* layout.replicated\(\)"):
        source.collect(0)
    cell.zero = None
    assert gathering_cell(model) is None
    batch, _ = source.collect(0)
    assert batch.ro.tokens.shape == (4, 3)


def test_bucketed_sums_equal_one_sum_per_gradient():
    """bucket_plan puts every gradient in exactly one bucket, last gradient first, one dtype per bucket, at most
    the bucket size unless a gradient alone is larger; bucketed_all_reduce with a stand-in reduction (x -> 3x,
    applied to each flattened bucket) returns each gradient's own result, in order and shape."""
    import mindspore as ms
    from ms_llm.training.collective import bucket_plan, bucketed_all_reduce
    rng = np.random.default_rng(0)
    shapes = [(4, 8), (8,), (16, 4), (3,), (2, 2, 2), (40,), (5, 5)]
    dtypes = [np.float32] * 4 + [np.float16] + [np.float32] * 2
    plan, where = bucket_plan(shapes, dtypes, bucket_bytes=160)
    seen = [i for index, _, _ in plan for i in index]
    assert sorted(seen) == list(range(len(shapes))) and seen[0] == len(shapes) - 1
    for index, sizes, shp in plan:
        assert len({dtypes[i] for i in index}) == 1 and sizes == tuple(int(np.prod(shapes[i])) for i in index)
        nbytes = sum(s * np.dtype(dtypes[i]).itemsize for s, i in zip(sizes, index))
        assert nbytes <= 160 or len(index) == 1
    assert len(plan) > 2
    values = [rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)]
    out = bucketed_all_reduce(lambda x: x * 3, tuple(ms.Tensor(v) for v in values), plan, where)
    assert len(out) == len(values)
    for got, want in zip(out, values):
        assert got.shape == want.shape and got.dtype == ms.Tensor(want).dtype
        np.testing.assert_array_equal(got.asnumpy(), want * 3)
