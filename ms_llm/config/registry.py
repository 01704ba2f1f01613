# SPDX-License-Identifier: Apache-2.0
"""Every stage, once: what runs it, its config section, what a pipeline may hand it, and where the technical
report puts it. The config's `stage:` choices, `ms-llm train --help`, validation (config/validate.py STAGE_RULES,
keyed by these names), `ms-llm pipeline`'s hand-offs and the reports all read this table; tests/test_registry.py
fails when a stage is missing from any of them.

A new stage needs: its entry here, its rules in config/validate.py's STAGE_RULES, its config section in
config/schema.py, and its own module under stages/ with `run(cfg, layout) -> summary`.
"""
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class StageEntry:
    module: str                                  # stages/<module>.py: run(cfg, layout) -> summary
    section: Optional[str]                       # its own config section (None: only the shared ones)
    handoffs: dict = field(default_factory=dict)  # pipeline `inputs` key -> (path key, SHA256 key or None)
    frozen: tuple = ()                           # FrozenModelSection keys a pipeline fills with .path and .sha256
    report: str = "pretraining"                  # technical report part: pretraining | sft | reward | rl
    paradigm: str = ""                           # the RL part's name for it
    loss_text: str = ""                          # the technical report's loss formula


MODEL = {"model": ("model.init_from", "model.init_sha256")}

STAGES = {
    "pretrain": StageEntry("pretrain", None, MODEL, loss_text="next-token cross-entropy, mean over tokens"),
    "cpt": StageEntry("cpt", "cpt", MODEL, loss_text="next-token cross-entropy, mean over tokens (mixture of "
                                                     "domain and general data)"),
    "distill": StageEntry("distill", "distill", MODEL, ("distill.teacher",),
                          loss_text="α·T²·KL(p_teacher^T ‖ p_student^T) + β·CE(hard labels), T the temperature"),
    "sft": StageEntry("sft", "sft", MODEL, report="sft",
                      loss_text="cross-entropy on assistant tokens only, weighted per task and normalised per turn"),
    "reward": StageEntry("reward", "reward", MODEL, report="reward",
                         loss_text="Bradley–Terry: −log σ(r(x, y_chosen) − r(x, y_rejected)), mean over pairs"),
    "dpo": StageEntry("dpo", "dpo", {**MODEL, "dpo.winrate.judge": ("dpo.winrate.judge", None)}, ("dpo.reference",),
                      report="rl", paradigm="DPO family",
                      loss_text="−log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]) "
                                "(sigmoid form; the configured dpo.loss selects a variant, docs/rl.md)"),
    "ppo": StageEntry("ppo", "ppo", {**MODEL, "ppo.reward_model": ("ppo.reward_model", "ppo.reward_sha256")},
                      ("ppo.reference",), report="rl", paradigm="PPO-RLHF",
                      loss_text="L = −E_t[min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)] with dual-clip "
                                "max(·, c·A_t) for A_t < 0, ρ_t = π(a_t|s_t)/π_old(a_t|s_t); value loss "
                                "c_v·E_t[max((V − R)², (clip(V, V_old ± ε_v) − R)²)]; per-token reward "
                                "r_t = R_RM·[t = T] − β·KL_t, advantages by GAE(γ, λ), whitened"),
    "grpo": StageEntry("grpo", "grpo", {**MODEL, "grpo.reward_model": ("grpo.reward_model", "grpo.reward_sha256")},
                       ("grpo.reference",), report="rl", paradigm="GRPO family (verifiable rewards)",
                       loss_text="ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) (+ dual clip, + β·k3 to the "
                                 "reference), A the group-normalised reward, ρ per token or per sequence (GSPO), "
                                 "aggregated as grpo.loss_agg says"),
}
STAGE_NAMES = tuple(STAGES)


def handoff_keys() -> dict:
    """Every pipeline `inputs` key a stage accepts -> (path key, SHA256 key or None), frozen sections included."""
    keys = {}
    for entry in STAGES.values():
        keys.update(entry.handoffs)
        keys.update({k: (k + ".path", k + ".sha256") for k in entry.frozen})
    return keys


def kinds(report: str) -> tuple:
    """The stages the technical report puts in `report`'s part, in table order."""
    return tuple(name for name, e in STAGES.items() if e.report == report)
