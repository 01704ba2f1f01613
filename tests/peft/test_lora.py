# SPDX-License-Identifier: Apache-2.0
"""LoRA: only adapters train, merge equals base + adapter, adapters load in Hugging Face PEFT, several adapters."""
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.cli import main
from ms_llm.errors import MsLlmError
from ms_llm.losses.lm import LMLoss
from ms_llm.models import CausalLM, load_pretrained, preset, save_pretrained
from ms_llm.peft import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, set_adapter
from ms_llm.peft.lora import AdapterDisabled
from ms_llm.training.optim import AdamW
from ms_llm.training.step import LossScaleState, TrainStep

IDS = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int32)


def _trained_lora(tmp_path, targets=("q_proj", "v_proj"), steps=3, seed=0):
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=256, tie_word_embeddings=False))
    save_pretrained(model, tmp_path / "base")
    np.random.seed(seed)
    lora = apply_lora(model, LoRAConfig(8, 16, 0.05, list(targets)))
    loss_net = LMLoss(model)
    assert {id(p) for p in loss_net.trainable_params()} == {id(p) for p in lora}
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.0), LossScaleState(False), 1, 1.0)
    rng = np.random.RandomState(seed)
    for _ in range(steps):
        ids = rng.randint(0, 256, (4, 17)).astype(np.int32)
        step([(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))], 1e-2)
    model.set_train(False)
    return model


def test_only_adapter_parameters_change(tmp_path, graph_mode):
    model = _trained_lora(tmp_path)
    base = dict(load_pretrained(tmp_path / "base").parameters_and_names())
    for name, p in model.parameters_and_names():
        if ".lora_" in name:
            continue
        assert np.array_equal(p.asnumpy(), base[name].asnumpy()), name   # bit-identical base weights
    lora_b = [p for n, p in model.parameters_and_names() if ".lora_B" in n]
    assert len(lora_b) == 4 and all(np.abs(p.asnumpy()).max() > 0 for p in lora_b)   # B started at zero


def test_merge_equals_base_plus_adapter_and_cli_verifies(tmp_path, capsys):
    model = _trained_lora(tmp_path, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    ours = model(Tensor(IDS)).asnumpy()
    assert np.abs(merge_lora(model)(Tensor(IDS)).asnumpy() - ours).max() <= 1e-4
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge-lora", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "max logit difference" in capsys.readouterr().out
    merged = load_pretrained(tmp_path / "merged")
    assert np.abs(merged(Tensor(IDS)).asnumpy() - ours).max() <= 1e-4
    plain = load_pretrained(tmp_path / "base")(Tensor(IDS)).asnumpy()
    assert np.abs(plain - ours).max() > 1e-3                             # the adapter did something


def test_adapter_loads_in_hf_peft_with_same_logits(tmp_path):
    import peft
    import torch
    import transformers
    model = _trained_lora(tmp_path)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == ["q_proj", "v_proj"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(model(Tensor(IDS)).asnumpy() - ref).max() <= 1e-4


def test_several_adapters_on_one_base(tmp_path):
    a = _trained_lora(tmp_path / "a", seed=1)
    b = _trained_lora(tmp_path / "b", seed=2)
    save_adapter(a, tmp_path / "ad_a")
    save_adapter(b, tmp_path / "ad_b")
    base = load_pretrained(tmp_path / "a" / "base")
    load_adapter(base, tmp_path / "ad_a", "a")
    load_adapter(base, tmp_path / "ad_b", "b")
    assert np.abs(base(Tensor(IDS)).asnumpy() - b(Tensor(IDS)).asnumpy()).max() <= 1e-5
    set_adapter(base, "a")
    assert np.abs(base(Tensor(IDS)).asnumpy() - a(Tensor(IDS)).asnumpy()).max() <= 1e-5
    with pytest.raises(MsLlmError, match="adapter 'c' is not loaded"):
        set_adapter(base, "c")


class _PolicyMinusReference(ms.nn.Cell):
    """Both views of one LoRA model in one graph, in either order (as a loss cell with an online reference)."""

    def __init__(self, model, ref_first):
        super().__init__()
        self.model, self.ref, self.ref_first = model, AdapterDisabled(model), ref_first

    def construct(self, ids):
        if self.ref_first:
            ref = self.ref(ids)
            pol = self.model(ids)
        else:
            pol = self.model(ids)
            ref = self.ref(ids)
        return ms.ops.square(pol - ref).sum(), ref


@pytest.mark.slow
def test_adapter_disabled_view_is_the_base_and_leaves_the_policy_alone(tmp_path, graph_mode):
    model = _trained_lora(tmp_path)
    ours = model(Tensor(IDS)).asnumpy()
    base = load_pretrained(tmp_path / "base")(Tensor(IDS)).asnumpy()
    assert np.abs(base - ours).max() > 1e-3
    view = AdapterDisabled(model)
    np.testing.assert_allclose(view(Tensor(IDS)).asnumpy(), base, atol=1e-5)
    np.testing.assert_allclose(model(Tensor(IDS)).asnumpy(), ours, atol=1e-6)     # adapters back on
    view.set_train(True)
    assert not model.training                                                   # the view leaves modes alone
    lora = [p for n, p in model.parameters_and_names() if ".lora_B" in n]
    want_grads = None
    for ref_first in (False, True):                     # inside one differentiated graph, either order
        net = _PolicyMinusReference(model, ref_first)
        (value, ref), grads = ms.value_and_grad(net, None, lora, has_aux=True)(Tensor(IDS))
        np.testing.assert_allclose(ref.asnumpy(), base, atol=1e-5)
        assert float(value.asnumpy()) == pytest.approx(float(np.square(ours - base).sum()), rel=1e-4)
        g = [x.asnumpy() for x in grads]
        assert all(np.abs(x).max() > 0 for x in g)      # the policy half carries the gradient
        want_grads = want_grads or g
        for x, y in zip(g, want_grads):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
    assert float(model.lora_gate.asnumpy()) == 1.0
    with pytest.raises(MsLlmError, match="needs a LoRA model"):
        AdapterDisabled(load_pretrained(tmp_path / "base"))
    saved = save_adapter(model, tmp_path / "adapter2")
    from ms_llm.models.safetensors_io import read_safetensors
    assert not any("gate" in k for k in read_safetensors(str(tmp_path / "adapter2" / saved[0])))


def _fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _keep_reference(shape, key: int, layer: int, p: float):
    """Independent NumPy (uint32) reference of the LoRA dropout multiplier: murmur3's finaliser over
    (index * golden ratio) xor key xor the layer's salt; kept when the low 24 bits are >= p * 2^24."""
    with np.errstate(over="ignore"):
        salt = _fmix32(np.uint32(layer + 1))
        idx = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
        h = _fmix32((idx * np.uint32(0x9E3779B1)) ^ np.array(key, np.int32).view(np.uint32) ^ salt)
    return ((h & np.uint32(0xFFFFFF)) >= round(p * (1 << 24))).astype(np.float32) / (1 - p)


class _Call(ms.nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return self.cell(x)


def test_lora_dropout_is_a_hash_of_key_layer_and_position(graph_mode):
    from ms_llm.peft.lora import LoRALinear, dropout_key, noise_key
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=256))
    p = 0.25
    apply_lora(model, LoRAConfig(4, 8, p, ["q_proj", "v_proj"]))
    layers = [c for _, c in model.cells_and_names() if isinstance(c, LoRALinear)]
    assert noise_key(LMLoss(model)) is model.lora_noise_key            # what an updater finds and sets
    layer = 3
    lin = layers[layer]
    rng = np.random.RandomState(1)
    lin.lora_B.weight.set_data(Tensor(rng.normal(0, 0.5, lin.lora_B.weight.shape).astype(np.float32)))
    x = rng.normal(0, 1, (3, 7, lin.in_features)).astype(np.float32)
    net = _Call(lin)
    net.set_train(True)
    base = x @ lin.weight.asnumpy().T
    a, b = lin.lora_A.weight.asnumpy(), lin.lora_B.weight.asnumpy()
    outs = {}
    for key in (dropout_key(0, 5, 0, 0), dropout_key(0, 5, 1, 0), dropout_key(0, 5, 0, 0)):
        model.lora_noise_key.set_data(Tensor(key, ms.int32))          # as the updater does per micro-batch
        got = net(Tensor(x)).asnumpy()
        keep = _keep_reference(x.shape, key, layer, p)
        want = base + lin.scaling * (x * keep) @ a.T @ b.T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert abs((keep == 0).mean() - p) < 0.03
        if key in outs:
            np.testing.assert_array_equal(got, outs[key])             # the same key, the same elements dropped
        outs[key] = got
    assert len(outs) == 2 and np.abs(np.subtract(*outs.values())).max() > 1e-3
    # another layer with the same key drops other elements; keys differ by step, micro-batch and rank
    assert (_keep_reference(x.shape, 7, 0, p) != _keep_reference(x.shape, 7, 1, p)).mean() > 0.2
    keys = {dropout_key(s, t, m, r) for s in (0, 1) for t in range(4) for m in range(3) for r in range(2)}
    assert len(keys) == 48 and all(-2 ** 31 <= k < 2 ** 31 for k in keys)
    net.set_train(False)                                             # no dropout outside training
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), base + lin.scaling * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_updater_sets_a_dropout_key_per_step_and_micro_batch(tmp_path, graph_mode):
    """The key each micro-batch trains with is dropout_key(seed, step, micro-batch, rank), set before it runs."""
    from ms_llm.config import load_config
    from ms_llm.peft.lora import dropout_key
    from ms_llm.training.updater import Updater
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["train.loss_scale=none", "train.seed=7"], check=False)
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=256))
    apply_lora(model, LoRAConfig(4, 8, 0.1, ["q_proj", "v_proj"]))
    updater = Updater("policy", cfg, LMLoss(model), model, accum_steps=3)
    ids = np.random.RandomState(0).randint(0, 256, (3, 2, 9)).astype(np.int32)
    seen = []

    def batches():
        for b in ids:
            yield Tensor(b[:, :-1]), Tensor(b[:, 1:])
            seen.append(int(model.lora_noise_key.asnumpy()))          # the key this micro-batch was trained with
    for step in (4, 5):
        updater(batches(), step)
    assert seen == [dropout_key(7, s, m, 0) for s in (4, 5) for m in range(3)]
    assert len(set(seen)) == 6


def test_half_precision_base_trains_the_adapters_and_merges_into_the_float32_base(tmp_path, graph_mode):
    """lora.base_dtype float16 (peft.lora.hold_base): the base held in float16 with the reference ops, the
    adapters float32 and the only parameters that move; the merge into the float32 base equals merging the
    same adapters into a float32 copy of the model exactly, and differs from merging into the rounded base."""
    from ms_llm.peft.lora import hold_base
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=256, tie_word_embeddings=False))
    base32 = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    apply_lora(model, LoRAConfig(8, 16, 0.0, ["q_proj", "v_proj"]))
    assert hold_base(model, "float16", "sft.lora") == "float16"
    dtypes = {n: p.dtype for n, p in model.parameters_and_names()}
    assert {d for n, d in dtypes.items() if ".lora_A" in n or ".lora_B" in n} == {ms.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {ms.float16}
    assert model.model.layers[0].self_attn.q_proj.backend == "reference" and model.loss_backend == "reference"
    loss_net = LMLoss(model)
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.0), LossScaleState(False), 1, 1.0)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 256, (4, 17)).astype(np.int32)
    losses = [step([(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))], 1e-2)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    frozen = {n: p.asnumpy() for n, p in model.parameters_and_names() if ".lora_" not in n}
    assert all(np.array_equal(frozen[n], base32[n].astype(np.float16)) for n in frozen)   # the base never moved
    merged = merge_lora(model, base32)
    reference = CausalLM(model.config)
    for n, p in reference.parameters_and_names():
        p.set_data(Tensor(base32[n]))
    apply_lora(reference, LoRAConfig(8, 16, 0.0, ["q_proj", "v_proj"]))
    for (n, p), (m, q) in zip(model.parameters_and_names(), reference.parameters_and_names()):
        if ".lora_A" in n or ".lora_B" in n:
            assert n == m
            q.set_data(Tensor(p.asnumpy()))
    want = merge_lora(reference)
    for (n, p), (_, q) in zip(merged.parameters_and_names(), want.parameters_and_names()):
        np.testing.assert_array_equal(p.asnumpy(), q.asnumpy())
    rounded = merge_lora(model)
    gap = np.abs(rounded.model.layers[0].self_attn.q_proj.weight.asnumpy() -
                 merged.model.layers[0].self_attn.q_proj.weight.asnumpy()).max()
    assert gap > 0
