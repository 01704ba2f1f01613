# SPDX-License-Identifier: Apache-2.0
"""`ms-llm plan`: the 7B state arithmetic against a hand count, every shipped Qwen2.5 config planned, launch
refusing a config that does not fit, and (slow) the plan against peak RSS measured from outside."""
import glob
import json
import os
import shutil
import sys

import pytest

from ms_llm.cli import main
from ms_llm.config import load_config
from ms_llm.plan import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "qwen2.5", "*.yaml")) if "pipeline" not in f)


def test_qwen25_7b_weights_gradients_and_adam_equal_a_hand_count():
    """7b_sft_full on 8 ranks with ZeRO-1: float32 masters, gradients + the unscaled copy + the accumulation buffer
    (32 micro-batches), AdamW's moments over 8 ranks plus ZeRO-1's full-size float32 updates; with ZeRO-3 (the
    shipped config) an eighth of each, plus one layer's and the lm_head's bf16 matrices gathered whole and the
    lm_head's float32 gradient before its reduce-scatter."""
    path = os.path.join(ROOT, "configs", "qwen2.5", "7b_sft_full.yaml")
    cfg = load_config(path, ["parallel.optimizer_shard=zero1"], check=False)
    parts = {c["name"]: c["bytes"] for c in plan(cfg, 8, 1, "910b")["components"]}
    n = 7_615_616_512                                   # Qwen2.5-7B (tests/models/test_hf_parity.py)
    assert parts["model weights"] == 30_462_466_048 == 4 * n
    assert parts["model gradients"] == 91_387_398_144 == 3 * 4 * n
    assert parts["model optimizer"] == 38_078_082_560 == 8 * n // 8 + 4 * n
    parts = {c["name"]: c["bytes"] for c in plan(load_config(path, check=False), 8, 1, "910b")["components"]}
    assert parts["model weights"] == 3_807_808_256 == 4 * n // 8
    assert parts["model gradients"] == 11_423_424_768 == 3 * 4 * n // 8
    assert parts["model optimizer"] == 7_615_616_512 == 8 * n // 8
    layer = 3584 * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944           # q, k, v, o, gate, up, down
    head = 152_064 * 3584
    assert parts["model gathered weights"] == 2 * (layer + head) + 4 * head


def test_the_rollout_kv_cache_is_each_ranks_share_of_the_batch():
    """7b_grpo_math: 512 rows (32 prompts x 16) of 28 layers x 2 x 4 kv heads x 128 x bfloat16 x 22,528 slots —
    the whole batch in one process, a sixteenth per rank on 16 ranks (synchronous rollouts split the rows), and
    the whole batch again on every rank when rollouts are partial (their paused batches are not split); with
    continuous batching, the generation batch."""
    path = os.path.join(ROOT, "configs", "qwen2.5", "7b_grpo_math.yaml")
    assert load_config(path, check=False).grpo.generation_batch_size == 16
    assert {c["name"]: c["bytes"] for c in plan(load_config(path, check=False), 8, 1, "910b")["components"]}[
        "rollout KV cache"] == 16 * 28 * 2 * 4 * 128 * 2 * 22528
    cfg = load_config(path, ["grpo.generation_batch_size=0"], check=False)
    g = cfg.grpo
    rows, cap = g.prompts_per_step * g.group_size, -(-(g.max_prompt_len + g.max_new_tokens) // 64) * 64
    per_row = 28 * 2 * 4 * 128 * 2 * cap

    def kv(config, ranks):
        return {c["name"]: c["bytes"] for c in plan(config, ranks, 1, "910b")["components"]}["rollout KV cache"]
    assert rows == 512 and kv(cfg, 1) == rows * per_row
    assert kv(cfg, 16) == rows // 16 * per_row
    partial = load_config(path, ["grpo.partial_rollout.token_budget=256", "grpo.generation_batch_size=0"], check=False)
    assert kv(partial, 16) == rows * per_row
    odd = load_config(path, ["grpo.prompts_per_step=20", "grpo.generation_batch_size=0"], check=False)  # 2 x 16
    assert kv(odd, 16) == 2 * 16 * per_row
    # agentic episodes: each rank its share of whole episodes, or (paused between steps by turns) the whole batch
    agent = os.path.join(ROOT, "configs", "qwen2.5", "7b_grpo_agent.yaml")
    a = load_config(agent, check=False).grpo
    cap = -(-(a.max_prompt_len + a.max_new_tokens) // 64) * 64
    assert kv(load_config(agent, check=False), 16) == 256 // 16 * 28 * 2 * 4 * 128 * 2 * cap
    assert kv(load_config(agent, ["grpo.agent.turns_per_step=2"], check=False), 16) == 256 * 28 * 2 * 4 * 128 * 2 * cap


def test_a_zero3_grpo_step_holds_a_rollout_copy_and_its_phases_one_at_a_time():
    """7b_grpo_math on its 2 x 8 NPUs: ZeRO-3 shards a sixteenth of the float32 states; each rank keeps a whole
    bfloat16 copy of every matrix to generate with (2 bytes x the hand-counted matrices); the KV cache (rollout)
    and the train step's gathered matrices, activations and logits (train) are never held at once, so the total
    is what is held throughout plus the larger phase. Partial rollouts keep their paused caches: no phases."""
    path = os.path.join(ROOT, "configs", "qwen2.5", "7b_grpo_math.yaml")
    cfg = load_config(path, check=False)
    assert (cfg.plan.nnodes, cfg.plan.nproc_per_node, cfg.parallel.optimizer_shard) == (2, 8, "zero3")
    p = plan(cfg, 8, 2, "910b")
    parts = {c["name"]: c for c in p["components"]}
    layer = 3584 * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944
    head = 152_064 * 3584
    assert parts["policy rollout copy"]["bytes"] == 2 * (28 * layer + 2 * head)     # untied embedding and lm_head
    assert parts["rollout KV cache"]["phase"] == "rollout"
    assert {n for n, c in parts.items() if c["phase"] == "train"} == {
        "policy gathered weights", "policy activations", "policy logits"}
    held = sum(c["bytes"] for c in parts.values() if not c["phase"])
    rollout, train = (sum(c["bytes"] for c in parts.values() if c["phase"] == ph) for ph in ("rollout", "train"))
    assert p["total_bytes"] == held + max(rollout, train) < held + rollout + train
    assert p["fits"] and p["total_bytes"] <= 58 * 2 ** 30
    assert not plan(cfg, 8, 1, "910b")["fits"]                                    # one node: 59.8 GB
    partial = load_config(path, ["grpo.partial_rollout.token_budget=256", "grpo.generation_batch_size=0",
                                 "grpo.dynamic_sampling.max_rounds=1"], check=False)
    assert all(not c["phase"] for c in plan(partial, 8, 2, "910b")["components"])
    whole = load_config(path, ["parallel.optimizer_shard=none"], check=False)
    assert "policy rollout copy" not in {c["name"] for c in plan(whole, 8, 2, "910b")["components"]}


def test_every_shipped_qwen_config_is_planned(capsys):
    """`ms-llm plan --json` for every configs/qwen2.5 stage config on the ranks it states: the components, their
    sum, and the verdict against the budget (which of them fit today is in docs/launch.md)."""
    verdicts = {}
    for path in QWEN:
        assert main(["plan", path, "--json"]) == 0
        p = json.loads(capsys.readouterr().out)
        names = [c["name"] for c in p["components"]]
        assert any(n.endswith("weights") for n in names) and names[-1] == "runtime"
        held = sum(c["bytes"] for c in p["components"] if not c["phase"])
        phases = [sum(c["bytes"] for c in p["components"] if c["phase"] == ph) for ph in ("rollout", "train")]
        assert p["total_bytes"] == held + max(phases)
        assert p["budget_bytes"] == 58 * 2 ** 30 and p["fits"] == (p["total_bytes"] <= p["budget_bytes"])
        assert p["fits"] or p["suggestion"]
        verdicts[os.path.basename(path)] = p["fits"]
    fit = ("0.5b_pretrain.yaml", "7b_cpt.yaml", "7b_distill_from_72b.yaml", "7b_dpo.yaml", "7b_dpo_lora.yaml",
           "7b_grpo_agent.yaml", "7b_grpo_math.yaml", "7b_ppo.yaml", "7b_reward.yaml", "7b_sft_agent.yaml",
           "7b_sft_full.yaml", "7b_sft_lora.yaml")
    assert all(verdicts[k] for k in fit) and len(verdicts) == len(fit)
    # a model directory that is not here and no plan.shapes entry: one message naming the key to set
    assert main(["plan", QWEN[-1], "plan.shapes={}"]) == 2
    assert "set plan.shapes.model to a preset" in capsys.readouterr().err


def test_launch_refuses_a_config_the_plan_rejects(capsys):
    big = [os.path.join(ROOT, "configs", "tiny", "pretrain.yaml"), "model.overrides.hidden_size=8192", "model.overrides.intermediate_size=22016",
           "model.overrides.num_hidden_layers=16", "model.overrides.num_attention_heads=64",
           "model.overrides.num_key_value_heads=8", "--nproc-per-node", "2", "--dry-run"]
    assert main(["launch", *big]) == 2
    err = capsys.readouterr().err
    assert "the memory plan does not fit" in err and "model weights" in err and "41.28" in err and "--force" in err
    assert main(["launch", *big, "--force"]) == 0
    assert "msrun --worker_num=2" in capsys.readouterr().out


BENCH = ["model.overrides.hidden_size=512", "model.overrides.intermediate_size=1376", "model.overrides.vocab_size=8192",
         "model.overrides.num_attention_heads=8", "model.overrides.num_key_value_heads=8",
         "model.overrides.max_position_embeddings=512", "model.overrides.num_hidden_layers=8",
         "train.micro_batch_size=8", "data.seq_len=128"]
COMMON = ["train.max_steps=12", "log.tensorboard=false", "log.plots=false", "train.progress_bar=false",
          "lr_schedule.warmup_steps=2", "data.eval_fraction=0", "checkpoint.every=0"]


LORA_SFT = ["model.init_from=null", "model.preset=tiny", "train.eval_every=0", "sft.eval_prompts=null",
            "sft.lora.base_dtype=float16"] + [o for o in BENCH if "vocab" not in o]   # the tokenizer's vocabulary


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case,config,extra,ranks", [
    ("tiny", "pretrain", [], 1), ("bench33m", "pretrain", BENCH, 1),
    ("bench33m_reference", "pretrain", BENCH + ["context.kernels=reference"], 1),
    ("bench33m_dp2", "pretrain", BENCH, 2), ("bench33m_zero3", "pretrain", BENCH + ["parallel.optimizer_shard=zero3"], 2),
    ("lora_sft_float16_base", "sft_lora", LORA_SFT, 1)])
def test_plan_is_within_20_percent_of_the_peak_rss_measured_from_outside(tiny_pretrained, case, config, extra, ranks):
    """Each worker's resident-set high-water mark, sampled from /proc of the process tree (never the run's own
    accounting), against the plan's total for one rank: the tiny pretrain, the 33M bench model with the CPU
    kernels and with the reference ops, on 2 msrun ranks plain and with ZeRO-3, and LoRA SFT of the 33M shape
    (the tokenizer's vocabulary) with its base held in float16."""
    from ms_llm.bench import process_tree_peaks
    args = [f"configs/tiny/{config}.yaml", *COMMON, *extra, f"train.output_dir=runs/plan_{case}"]
    shutil.rmtree(tiny_pretrained / "runs" / f"plan_{case}", ignore_errors=True)
    cmd = [sys.executable, "-m", "ms_llm.cli"]
    cmd += ["train", *args] if ranks == 1 else ["launch", *args, "--nproc-per-node", str(ranks), "--log-dir",
                                                 f"logs_plan_{case}", "--master-port", "8181"]
    rc, seen, err = process_tree_peaks(cmd, cwd=tiny_pretrained)
    assert rc == 0, err
    if ranks == 1:
        ours = {pid for pid, v in seen.items() if "ms_llm.cli train" in v["cmd"]}
        # the trainer, not the helpers it forks (which share its command line)
        peaks = [seen[pid]["peak_mb"] for pid in ours if seen[pid]["ppid"] not in ours]
    else:      # each worker names its pid in its status file: rank 0 first
        pids = [json.load(open(tiny_pretrained / f"logs_plan_{case}" / f"rank_{r}.status"))["pid"] for r in range(ranks)]
        peaks = [seen[pid]["peak_mb"] for pid in pids]
    assert len(peaks) == ranks
    os.chdir(tiny_pretrained)
    cfg = load_config(args[0], args[1:] + ([f"parallel.data_parallel={ranks}"] if ranks > 1 else []), check=False)
    p = plan(cfg, ranks, 1, "cpu")
    planned, staging = p["total_bytes"] / 2 ** 20, p["rank0_host_bytes"] / 2 ** 20
    print(f"{case}: planned {planned:.0f} MB (+{staging:.0f} MB on rank 0), measured {[round(x) for x in peaks]} MB")
    # rank 0, which writes the checkpoints, also gathers ZeRO-3's whole tensors
    for peak, want in zip(peaks, [planned + staging] + [planned] * (len(peaks) - 1)):
        assert abs(want - peak) <= 0.2 * peak, (case, planned, staging, peaks)
