# SPDX-License-Identifier: Apache-2.0
"""The experiment config: one dataclass per concern, strict, with help text on every field.

A YAML file maps 1:1 onto `ExperimentConfig`; `ms-llm train --help-config` prints every field with its
help. Stage sections (`pretrain`, later `distill`, `sft`, ...) hold only what that stage adds.
"""
from dataclasses import dataclass, field
from typing import Optional

from ms_llm.config.registry import STAGE_NAMES

# Names a config may use, implemented in the layers above: validation reads them here, and each implementing
# module takes its list from here (losses/dpo.py, rollout/verifiable.py, data/filters.py), so they cannot drift.
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto")
REFERENCE_FREE_DPO_LOSSES = ("simpo", "orpo")     # no reference model
GRPO_REWARDS = ("exact_match", "code", "format", "reward_model")
TEXT_RULES = ("repetition", "truncation", "brackets", "mojibake", "language")


def opt(default, help: str, choices=None, range: str = None, aliases: dict = None):
    """A config field with help text, allowed values and, for numbers, an allowed range kept in its metadata.

    `range` is an interval such as "(0, inf)", "[1, inf)" or "[0, 1)"; numeric fields without one must be
    non-negative ("[0, inf)"): no key of this config means anything below zero. `aliases` maps values a
    config may still write (e.g. YAML's true/false for a key that became a choice) to the choice they mean.
    """
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "range": range, "aliases": aliases}, **kw)


@dataclass
class ModelSection:
    preset: Optional[str] = opt(None, "Preset name (tiny, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen3-8b, llama3-8b); "
                                      "ignored when init_from is set")
    init_from: Optional[str] = opt(None, "Start from these weights: a Hugging Face dir, ms_llm checkpoint or run dir")
    init_sha256: Optional[str] = opt(None, "Expected SHA256 of init_from's MANIFEST.json (stage hand-off); a mismatch refuses to start")
    overrides: dict = opt(dict, "ModelConfig fields to change on the preset (e.g. {num_hidden_layers: 4})")


@dataclass
class TokenizerSection:
    path: Optional[str] = opt(None, "Tokenizer dir or file (tokenizer.json or tokenizer.model); default: the model's dir")
    chat_template: str = opt("chatml", "Chat template for conversational data",
                             ["chatml", "qwen", "llama3", "llama2", "plain"])


PACKING_STAGES = ("pretrain", "cpt", "sft")     # the stages that read data.packing (and pack by default)


@dataclass
class DataSource:
    path: str = opt("", "JSONL file")
    format: str = opt("text", "Record format", ["text", "alpaca", "sharegpt", "openai", "xlam", "preference", "prompts",
                                                "unpaired"])
    weight: float = opt(1.0, "Sampling weight in the mixture (normalized over sources)")
    domain: Optional[str] = opt(None, "Domain tag (defaults to the record's `domain` field, else 'general')")


@dataclass
class DataSection:
    sources: list = opt(list, "List of {path, format, weight, domain} sources")
    index: Optional[str] = opt(None, "Tokenized shard index (`ms-llm data index`): its domain-tagged shards join the "
                                     "sources, weighted by tokens within their domain (pretrain and cpt)")
    seq_len: int = opt(256, "Tokens per training sequence", range="[1, inf)")
    packing: Optional[bool] = opt(None, "Pack documents into full rows: pretrain and cpt join them with eos and cut "
                                        "windows, sft fills rows with whole conversations first-fit by length. "
                                        "Default: on for those stages, off (and refused) for the others")
    document_mask: bool = opt(True, "With packing: no attention across document boundaries; positions restart per document")
    cache_dir: Optional[str] = opt(None, "Tokenized cache directory (np.memmap shards + index); default <output_dir>/../.cache")
    on_error: str = opt("raise", "A malformed record: raise (error naming file:line) or skip and count it",
                        ["raise", "skip"])
    shuffle_seed: int = opt(1234, "Seed of the sample order (deterministic and resumable)")
    eval_fraction: float = opt(0.0, "Share of sequences held out for evaluation loss", range="[0, 1)")


@dataclass
class TrainSection:
    output_dir: str = opt("runs/default", "Run directory (metrics, checkpoints, final export)")
    max_steps: int = opt(100, "Optimizer steps", range="[1, inf)")
    micro_batch_size: int = opt(4, "Sequences per micro-batch per data-parallel rank", range="[1, inf)")
    grad_accum_steps: int = opt(1, "Micro-batches accumulated into one update", range="[1, inf)")
    global_batch_size: Optional[int] = opt(None, "Checked against micro_batch_size x grad_accum_steps x data_parallel", range="[1, inf)")
    clip_grad_norm: float = opt(1.0, "Global gradient-norm clip (0 disables)")
    amp_level: str = opt("O0", "Mixed precision: O0 fp32; O1 attention/MLP matmuls in compute_dtype; "
                               "O2 all matmuls incl. lm_head, fp32 master weights; O3 not supported on this release",
                         ["O0", "O1", "O2", "O3"])
    compute_dtype: str = opt("float16", "Matmul dtype under O1/O2 (float16 on CPU and 910A, bfloat16 on 910B)",
                             ["float16", "bfloat16"])
    loss_scale: str = opt("auto", "auto (dynamic for float16, none otherwise), dynamic, or none",
                          ["auto", "dynamic", "none"])
    loss_scale_init: float = opt(65536.0, "Initial dynamic loss scale", range="(0, inf)")
    loss_scale_factor: float = opt(2.0, "Scale divided by this on overflow and multiplied after a clean window", range="(1, inf)")
    loss_scale_window: int = opt(1000, "Clean steps before the scale grows", range="[1, inf)")
    log_every: int = opt(10, "Steps between metric lines", range="[1, inf)")
    eval_every: int = opt(0, "Steps between evaluations (0: only at the end)")
    seed: int = opt(0, "Seed for weights init and every RNG")
    progress_bar: bool = opt(True, "tqdm progress bar on rank 0")


@dataclass
class OptimSection:
    lr: float = opt(3e-4, "Peak learning rate", range="(0, inf)")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (never on norms and biases)")
    beta1: float = opt(0.9, "Adam beta1", range="[0, 1)")
    beta2: float = opt(0.95, "Adam beta2", range="[0, 1)")
    eps: float = opt(1e-8, "Adam epsilon", range="(0, inf)")


@dataclass
class LRScheduleSection:
    type: str = opt("cosine", "Schedule shape", ["constant", "linear", "cosine", "wsd"])
    warmup_steps: int = opt(0, "Linear warmup from 0")
    min_lr_ratio: float = opt(0.1, "Final lr as a fraction of the peak (linear, cosine, wsd)", range="[0, 1]")
    decay_steps: Optional[int] = opt(None, "WSD: length of the decay phase at the end (default 10% of max_steps)", range="[1, inf)")
    decay_shape: str = opt("cosine", "WSD decay shape", ["linear", "cosine", "sqrt", "exp"])


@dataclass
class CheckpointSection:
    every: int = opt(100, "Steps between checkpoints (0: only the final one)")
    keep: int = opt(5, "Checkpoints kept (older ones deleted)", range="[1, inf)")
    resume: str = opt("auto", "auto: continue from the newest valid checkpoint; none: start fresh; or a checkpoint path")
    reshard: bool = opt(False, "Allow resuming with a different data-parallel world size (checkpoints hold whole "
                               "tensors, so only the data position is re-split; it must divide evenly)")


@dataclass
class ParallelSection:
    data_parallel: int = opt(1, "Data-parallel ranks (msrun workers); 1 runs without msrun", range="[1, inf)")
    tensor_parallel: int = opt(1, "Tensor-parallel degree: attention heads and MLP columns split over this many ranks "
                                  "(Megatron layout, models/tensor_parallel.py; pretrain and cpt stages)", range="[1, inf)")
    pipeline_stages: int = opt(1, "Pipeline stages: consecutive decoder layers per rank, trained with GPipe's schedule "
                                  "over train.grad_accum_steps micro-batches (models/pipeline.py; pretrain and cpt)", range="[1, inf)")
    optimizer_shard: str = opt("none", "Shard training state across the data-parallel ranks (results equal the "
                                       "unsharded run). zero1: the Adam moments (each rank keeps ~1/data_parallel "
                                       "of them); zero3: weights, gradients and Adam moments, each matrix gathered "
                                       "just before use (training/zero.py; GRPO generates on a whole copy gathered "
                                       "before each rollout). true/false still mean zero1/none",
                               ["none", "zero1", "zero3"], aliases={True: "zero1", False: "none"})
    recompute: bool = opt(False, "Recompute each decoder layer's activations in the backward pass (less memory, ~30% more compute)")
    bucket_mb: float = opt(0.0, "Sum data-parallel gradients in buckets of this many MB: consecutive gradients "
                                "flattened into one buffer per AllReduce, in a fixed order (training/collective.py; "
                                "the same sums). It costs one more copy of the gradients while they are summed "
                                "(ms-llm plan counts it); 0: one AllReduce per gradient", range="[0, inf)")
    visible_devices: Optional[str] = opt(None, "ASCEND_RT_VISIBLE_DEVICES for the job, e.g. '0,1,2,3,4,5,6,7'")
    hccl_connect_timeout: int = opt(1800, "HCCL_CONNECT_TIMEOUT seconds (multi-node start-up can take minutes)", range="[1, inf)")
    hccl_exec_timeout: int = opt(1800, "HCCL_EXEC_TIMEOUT seconds for a collective to complete", range="[1, inf)")


@dataclass
class ContextSection:
    mode: str = opt("graph", "MindSpore execution mode (pynative for debugging)", ["graph", "pynative"])
    device_target: str = opt("cpu", "Device", ["cpu", "ascend"])
    kernels: str = opt("auto", "Implementation of the model's primitives (ms_llm/ops/backend.py): auto = the fastest "
                       "available (the CPU kernels of kernels/cpu on CPU, MindSpore's fused ops on Ascend), or "
                       "reference (MindSpore's composed ops), cpu or ascend", ["auto", "reference", "cpu", "ascend"])
    loss_chunk_tokens: int = opt(1024, "Tokens per chunk of the log-prob readout behind every LM, SFT, DPO, PPO and GRPO "
                                       "loss (models/readout.py): the lm_head product, log-softmax and their backward "
                                       "run one chunk at a time, so [B, S, V] logits never exist; 0 computes whole "
                                       "logits. The CPU kernels chunk on their own", range="[0, inf)")
    max_device_memory: str = opt("58GB", "Most device memory MindSpore's pool may take per process, as '<number>GB' "
                                 "(ms.runtime.set_memory max_size; 58GB is MindFormers' 910B setting, 64 GB of HBM "
                                 "less the runtime's own); Ascend only")
    memory_optimize_level: str = opt("O0", "MindSpore's memory optimisation level (ms.runtime.set_memory "
                                           "optimize_level): O1 reuses memory more aggressively; Ascend only",
                                     ["O0", "O1"])
    lazy_inline: str = opt("auto", "Compile each decoder layer once and call it per layer (mindspore.lazy_inline), "
                                   "instead of unrolling every layer into one graph: auto = on Ascend (MindFormers' "
                                   "setting), off on CPU, whose backend cannot compile it", ["auto", "always", "never"])
    jit_level: str = opt("default", "GRAPH_MODE compile level (jit_config jit_level): O0 kernel by kernel, O1 with "
                                    "graph fusion, O2 whole-graph sinking (Ascend only); default: MindSpore's choice "
                                    "for the device", ["default", "O0", "O1", "O2"])


@dataclass
class LogSection:
    tensorboard: bool = opt(True, "Write TensorBoard event files to <output_dir>/tensorboard")
    plots: bool = opt(True, "Write loss/lr plots to <output_dir>/plots when the stage ends")
    rollouts_every: int = opt(0, "RL stages (ppo, grpo): every N steps write that step's batch as the updaters got it "
                                 "(tokens, masks, per-token log-probs, values, rewards, KL, advantages, returns) to "
                                 "<output_dir>/rollouts/step_<N>.safetensors; 0: never", range="[0, inf)")


@dataclass
class PretrainSection:
    export_version: Optional[str] = opt(None, "Version tag written to final/MANIFEST.json (e.g. DATASET_v1.0_pretrain)")


@dataclass
class LoRASection:
    enabled: bool = opt(False, "Train LoRA adapters instead of all weights")
    r: int = opt(8, "LoRA rank", range="[1, inf)")
    alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / r)", range="(0, inf)")
    dropout: float = opt(0.05, "Dropout on the LoRA branch input", range="[0, 1)")
    targets: list = opt(lambda: ["q_proj", "v_proj"], "Linear layers to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    base_dtype: str = opt("auto", "dtype the frozen base weights are held in (peft/lora.hold_base): auto = bfloat16 on "
                                  "Ascend (half the memory), float32 on CPU; float16 on request. The adapters keep "
                                  "float32 masters; the export merges into the float32 base on disk",
                          ["auto", "float32", "float16", "bfloat16"])


@dataclass
class SFTPhase:
    name: str = opt("stage", "Phase name (its run directory is <output_dir>/<name>)")
    sources: list = opt(list, "Data sources of this phase (default: data.sources)")
    max_steps: Optional[int] = opt(None, "Optimizer steps of this phase (default: train.max_steps)", range="[1, inf)")
    micro_batch_size: Optional[int] = opt(None, "Micro-batch of this phase (default: train.micro_batch_size)", range="[1, inf)")
    grad_accum_steps: Optional[int] = opt(None, "Accumulation of this phase (default: train.grad_accum_steps)", range="[1, inf)")
    global_batch_size: Optional[int] = opt(None, "Checked like train.global_batch_size", range="[1, inf)")
    lr: Optional[float] = opt(None, "Peak learning rate of this phase (default: optim.lr)", range="(0, inf)")


@dataclass
class SFTSection:
    task_weights: dict = opt(lambda: {"qa": 1.0, "code": 1.5, "translation": 0.8, "reasoning": 1.2},
                             "Loss weight per record `task` (seed 000 §1.2.5.3.1); unknown tasks weigh 1.0")
    task_sampling: dict = opt(dict, "Sampling weight per task on top of the source weights (default 1.0)")
    identity: dict = opt(dict, "Self-cognition placeholders, e.g. {NAME: ms_llm-bot, AUTHOR: ms_llm team}, "
                               "substituted for {{NAME}} / {{AUTHOR}} in every message")
    keep_think: bool = opt(True, "Keep <think>...</think> reasoning blocks in assistant answers (false strips them)")
    max_turns: int = opt(15, "Assistant turns kept per dialogue (oldest dropped first)", range="[1, inf)")
    turn_decay: float = opt(1.0, "Weight decay^k on the k-th assistant turn before the last (1.0: all equal; 0: last "
                                 "turn only)", range="[0, 1]")
    lora: LoRASection = opt(LoRASection, "LoRA")
    neftune_alpha: float = opt(0.0, "NEFTune noise on input embeddings while training (Jain et al. 2023; 5 is typical; 0 disables)")
    phases: list = opt(list, "Run several phases back to back, each from the previous one's result (seed 000 "
                             "§1.2.5.3.1: all instructions, then the code/reasoning subset); list of {name, sources, max_steps, "
                             "micro_batch_size, grad_accum_steps, global_batch_size, lr}")
    eval_prompts: Optional[str] = opt(None, "Held-out prompts JSONL ({prompt, answer, task}) scored by exact match")
    eval_max_new_tokens: int = opt(32, "Generation length for the exact-match evaluation", range="[1, inf)")
    eval_limit: int = opt(64, "Evaluation prompts used (0: all)")
    eval_unsafe_no_isolation: bool = opt(False, "Run code answers without the namespace sandbox (an in-process "
                                                "guard and limits only; docs/eval.md) where it cannot be had")
    eval_dialogues: Optional[str] = opt(None, "Held-out sharegpt dialogues scored for inter-turn coherence (BERTScore F1)")
    eval_dialogue_limit: int = opt(16, "Dialogues used for the coherence score")
    eval_tool_calls: Optional[str] = opt(None, "Held-out tool-use conversations (OpenAI messages + tools) scored by "
                                               "tool-call accuracy (eval/agent.py)")
    eval_tool_call_limit: int = opt(64, "Tool-use conversations used (0: all)")
    dataset_manifest: Optional[str] = opt(None, "MANIFEST.json of the dataset release ({version, files: {name: sha256}}); "
                                               "its files are verified, and the version and hash are bound to the run")
    dataset_version: Optional[str] = opt(None, "Expected version tag in dataset_manifest (e.g. DATASET_v3.0_sft)")
    converge_metric: str = opt("eval/exact_match", "Metric watched for convergence at each evaluation")
    converge_tolerance: float = opt(0.01, "Stop when the metric moves less than this (relative) ...")
    converge_patience: int = opt(0, "... across this many consecutive evaluations (seed: 3; 0 disables the rule)")


@dataclass
class DistillGenerateSection:
    prompts: Optional[str] = opt(None, "Prompts JSONL ({prompt, answer?, task?}) the teacher answers before training "
                                       "(seed 000 §1.2.5.1.2); kept answers join the training data")
    temperature: float = opt(0.7, "Teacher sampling temperature")
    top_p: float = opt(0.9, "Teacher nucleus sampling", range="(0, 1]")
    max_new_tokens: int = opt(64, "Longest teacher answer", range="[1, inf)")
    batch_size: int = opt(16, "Prompts per generation batch", range="[1, inf)")
    limit: int = opt(0, "Prompts used (0: all)")
    max_perplexity: float = opt(3.0, "Filter: keep answers whose perplexity under the scoring model is below this")
    max_error_rate: float = opt(0.05, "Filter: keep answers whose rule-based error rate is below this", range="[0, 1]")
    min_consistency: float = opt(0.75, "Filter: keep answers whose BERTScore F1 against the reference exceeds this "
                                       "(records without a reference skip this filter)", range="[-1, 1]")
    scorer: Optional[str] = opt(None, "Model for the perplexity filter (default: the teacher)")
    embedder: Optional[str] = opt(None, "Model whose token embeddings BERTScore uses (default: the teacher)")
    rules: list = opt(lambda: list(TEXT_RULES),
                      "Text-quality rules applied (ms_llm.data.filters.RULES; plug in more there)")
    language: str = opt("auto", "Expected script for the language rule: latin, cjk or auto (same as the prompt)")


@dataclass
class DistillIterativeSection:
    every: int = opt(0, "Hard-example round every N steps (seed 000 §1.2.5.1.4); 0 disables the loop")
    probe: Optional[str] = opt(None, "Prompts JSONL with references the student is probed on for hard examples "
                                     "(default: distill.generate.prompts)")
    probe_limit: int = opt(64, "Probe prompts per round")
    max_rounds: int = opt(5, "Hard-example rounds at most", range="[1, inf)")


@dataclass
class DistillOnPolicySection:
    prompts: Optional[str] = opt(None, "Prompts JSONL ({prompt[, answer, task]}) the student answers by sampling "
                                       "(mode: on_policy); the teacher scores every sampled token")
    student_share: float = opt(1.0, "GKD's lambda: the share of steps trained on the student's own samples; the "
                                    "others take a batch of data.sources (off-policy)", range="[0, 1]")
    max_prompt_len: int = opt(48, "Prompt tokens kept (cut from the start)", range="[1, inf)")
    max_new_tokens: int = opt(24, "Tokens the student samples per prompt", range="[1, inf)")
    temperature: float = opt(1.0, "Sampling temperature of the student's answers", range="(0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling of the student's answers", range="(0, 1]")
    top_k: int = opt(0, "Top-k sampling of the student's answers (0: off)", range="[0, inf)")
    async_rollout: bool = opt(False, "Sample the next step's answers in a second process while this step's "
                                     "teacher scoring and update run (one step off-policy; needs student_share 1)")


@dataclass
class FrozenModelSection:
    path: Optional[str] = opt(None, "Model directory (Hugging Face layout or an ms_llm run)")
    sha256: Optional[str] = opt(None, "Expected model_sha256 of its MANIFEST.json (any other model is refused)")
    dtype: str = opt("auto", "dtype its weights are held and its matmuls computed in (models/frozen.py): auto = "
                             "bfloat16 on Ascend (half the memory of float32), float32 on CPU (where bfloat16 does "
                             "not compute; float16 on request)", ["auto", "float32", "float16", "bfloat16"])
    tokenizer: Optional[str] = opt(None, "Its tokenizer (default: the model directory's)")
    policy_without_adapter: bool = opt(False, "Instead of a path: the stage's own LoRA policy with its adapter "
                                              "disabled (one base model in memory; RLHF reference models)")


@dataclass
class DistillSection:
    teacher: FrozenModelSection = opt(FrozenModelSection, "The frozen teacher (teacher.path is required)")
    mode: str = opt("online", "Where teacher probabilities come from: the teacher live on the training data, a top-k "
                              "cache of them, or the teacher live on the student's own samples (on_policy: GKD)",
                    ["online", "cached", "on_policy"])
    cache_dir: Optional[str] = opt(None, "Top-k teacher cache written by `ms-llm distill cache-teacher` (mode: cached)")
    top_k: int = opt(20, "Teacher log-probs kept per token in the cache (plus the tail mass)", range="[1, inf)")
    cache_shard_examples: int = opt(1024, "Examples per cache shard file", range="[1, inf)")
    cache_tensor_parallel: int = opt(1, "Ranks the teacher is split over (tensor parallel) when `ms-llm distill "
                                        "cache-teacher` runs on several ranks; the ranks form groups of this many, "
                                        "each scoring its share of the cache's shards", range="[1, inf)")
    alpha: float = opt(0.8, "Weight of the distillation term (seed 000 §1.2.5.1.3)")
    beta: float = opt(0.2, "Weight of the hard-label cross-entropy")
    temperature: float = opt(1.0, "Softmax temperature for teacher and student (the KD term is scaled by tau^2)", range="(0, inf)")
    loss: str = opt("forward_kl", "Divergence", ["forward_kl", "reverse_kl", "jsd"])
    jsd_beta: float = opt(0.5, "Mixture weight of the generalized JSD", range="[0, 1]")
    chunk_size: int = opt(128, "Sequence positions per loss chunk (memory: [B, chunk, V] at a time) for the composed chunked loss; the CPU kernel for an online same-vocabulary teacher takes 256 rows at a time", range="[1, inf)")
    task_weights: dict = opt(lambda: {"code": 1.5, "reasoning": 1.5},
                             "Loss weight per record `task` (seed 000: code and reasoning x1.5); others 1.0")
    generate: DistillGenerateSection = opt(DistillGenerateSection, "Teacher sample generation and filtering")
    iterative: DistillIterativeSection = opt(DistillIterativeSection, "Iterative hard-example distillation")
    on_policy: DistillOnPolicySection = opt(DistillOnPolicySection, "On-policy distillation (mode: on_policy)")
    eval_prompts: Optional[str] = opt(None, "Held-out prompts ({prompt, answer, task}) scored by exact match for "
                                            "student and teacher (the acceptance gate)")
    eval_limit: int = opt(64, "Evaluation prompts used (0: all)")
    eval_max_new_tokens: int = opt(32, "Generation length for the evaluation", range="[1, inf)")
    gate_score_ratio: float = opt(0.9, "Gate: student score >= this x the teacher's")
    gate_plateau: float = opt(0.005, "Gate: relative training-loss improvement over the plateau window below this")
    plateau_window: int = opt(2, "Evaluations the plateau is measured across", range="[1, inf)")
    stop_at_gates: bool = opt(True, "Stop training when both gates pass (else run to max_steps)")
    version: str = opt("DATASET_v2.1_distill", "Version tag written into final/MANIFEST.json")


@dataclass
class CPTPhase:
    name: str = opt("phase", "Phase name (logged as the live phase)")
    until_tokens: Optional[float] = opt(None, "Consumed tokens where this phase ends (the last phase: leave unset)")
    weights: dict = opt(dict, "Domain -> sampling weight, e.g. {general: 60, science: 30, code: 10}")


@dataclass
class CPTMonitorSection:
    sets: dict = opt(dict, "Domain -> held-out text JSONL; evaluated at every train.eval_every (perplexity)")
    max_docs: int = opt(64, "Documents per held-out set")
    choice_sets: dict = opt(dict, "Domain -> multiple-choice JSONL ({question, choices, answer}); accuracy is "
                                  "evaluated with the held-out sets")
    choice_method: str = opt("cloze", "How choices are scored (eval/multiple_choice.py)", ["cloze", "choice", "letter"])
    max_questions: int = opt(64, "Questions per multiple-choice set")
    accuracy_threshold: float = opt(0.02, "Alarm when a domain's accuracy drops more than this (absolute; seed: 2 "
                                          "points) below its baseline")
    threshold: float = opt(0.02, "Alarm when a domain's held-out loss rises more than this (relative) over its "
                                 "baseline (seed: a 2-point drop)")
    boost: float = opt(1.3, "On alarm, that domain's sampling weight is multiplied by this (then renormalized)", range="(0, inf)")
    window: int = opt(3, "Terminate when the mean held-out loss varied less than `tolerance` across this many "
                         "evaluations and no domain is over its threshold (seed: 5k steps)", range="[2, inf)")
    tolerance: float = opt(0.001, "Relative variation for termination (seed: 0.1%)")
    stop: bool = opt(True, "Apply the termination rule (else run to train.max_steps)")


@dataclass
class CPTSection:
    phases: list = opt(list, "Mixture curriculum by consumed tokens: list of {name, until_tokens, weights} "
                             "(seed 000 §1.2.5.2.2); data.sources carry the domain tags")
    smoothing_tokens: float = opt(0.0, "Blend neighbouring phases linearly over this many tokens around a switch")
    anneal_weights: dict = opt(dict, "Domain weights from the start of the WSD decay on (annealing data, MiniCPM); "
                                     "empty: keep the curriculum")
    token_budget: Optional[float] = opt(None, "Tokens the run is meant to consume (progress is logged against it)")
    targets: dict = opt(dict, "Target held-out losses per domain (progress logged as eval/target_gap/<domain>)")
    monitor: CPTMonitorSection = opt(CPTMonitorSection, "Catastrophic-forgetting monitor (seed 000 §1.2.5.2.4)")
    export_version: Optional[str] = opt(None, "Version tag written into final/MANIFEST.json")


@dataclass
class RewardSection:
    num_layers: Optional[int] = opt(None, "Decoder layers kept from model.init_from, counted from the bottom (seed 000 "
                                          "§1.2.5.4.1: the first 30 of the 7B); empty: all of them", range="[1, inf)")
    head_hidden: Optional[int] = opt(None, "Width h of the MLP head hidden -> h -> 1 (default: the model's hidden size)", range="[1, inf)")
    activation: str = opt("gelu", "Activation between the head's two layers", ["gelu", "relu", "tanh", "silu"])
    center_coef: float = opt(0.0, "Reward centering c * mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023; "
                                  "0.01 when on, 0 disables)")
    use_margin: bool = opt(True, "Subtract each pair's `margin` field inside the sigmoid (pairs without one: 0)")
    tag_shares: dict = opt(dict, "Share of sampled pairs per `tag` (hard-example mixing; seed 000 §1.2.5.4.1: "
                                 "{safety_boundary: 0.25, logical_contradiction: 0.15}); other tags share the rest "
                                 "by size; empty: every pair equally likely")
    lora: LoRASection = opt(LoRASection, "LoRA on the backbone (the head always trains in full)")
    eval_data: Optional[str] = opt(None, "Held-out preference JSONL: accuracy, AUC, per-tag accuracy, ECE")
    eval_limit: int = opt(0, "Held-out pairs used (0: all)")
    eval_batch_size: int = opt(16, "Pairs per scoring batch", range="[1, inf)")
    calibration_fraction: float = opt(0.5, "Share of the held-out pairs Platt scaling is fitted on; the metrics "
                                           "are reported on the rest", range="[0, 1)")
    gate_auc: float = opt(0.92, "Gate: held-out AUC at least this (seed 000: 0.92)", range="[0, 1]")
    dataset_manifest: Optional[str] = opt(None, "MANIFEST.json of the preference data release; its files are "
                                               "verified and its version bound to the run")
    dataset_version: Optional[str] = opt(None, "Expected version tag in dataset_manifest (seed: DATASET_v2.2_rm)")
    export_version: Optional[str] = opt(None, "Version tag written into final/MANIFEST.json")


@dataclass
class WinRateSection:
    judge: Optional[str] = opt(None, "Reward model (an exported reward run) that judges; empty: no win-rate")
    prompts: Optional[str] = opt(None, "Prompts JSONL ({\"prompt\"}) to answer (default: the held-out pairs' prompts)")
    limit: int = opt(64, "Prompts judged", range="[1, inf)")
    max_new_tokens: int = opt(32, "Tokens generated per answer (greedy)", range="[1, inf)")


@dataclass
class DPOSection:
    loss: str = opt("sigmoid", "Objective (formulas and sources in docs/rl.md)",
                    list(DPO_LOSSES))
    beta: float = opt(0.1, "β: strength of the KL-regularisation (sigmoid, robust, ipo, hinge, kto), reward scale "
                           "(simpo: the paper uses 2.0-2.5) or odds-ratio weight λ (orpo)", range="(0, inf)")
    label_smoothing: float = opt(0.0, "ε: assumed share of flipped labels (sigmoid: cDPO; robust)", range="[0, 0.5)")
    simpo_gamma: float = opt(0.5, "SimPO target margin γ", range="[0, inf)")
    nll_coef: float = opt(0.0, "α of an added NLL term on the chosen answers' mean token log-prob (RPO); orpo has its own",
                          range="[0, inf)")
    kto_desirable_weight: float = opt(1.0, "KTO λ_D", range="(0, inf)")
    kto_undesirable_weight: float = opt(1.0, "KTO λ_U", range="(0, inf)")
    reference: FrozenModelSection = opt(FrozenModelSection, "The frozen reference; empty: a frozen copy of "
                                        "model.init_from, or with LoRA the policy with its adapter disabled")
    reference_mode: str = opt("online", "online: the reference scores every micro-batch; cached: it scores the "
                                        "whole dataset once into cache_dir and is unloaded before training",
                              ["online", "cached"])
    cache_dir: Optional[str] = opt(None, "Reference log-prob cache (default: <output_dir>/reference_logps)")
    lora: LoRASection = opt(LoRASection, "Train LoRA adapters on the policy instead of all weights")
    eval_data: Optional[str] = opt(None, "Held-out preference JSONL: preference accuracy and margin of the "
                                         "implicit reward (KTO: desirable vs undesirable pairs built from it)")
    eval_limit: int = opt(0, "Held-out pairs used (0: all)")
    eval_batch_size: int = opt(16, "Pairs per scoring batch", range="[1, inf)")
    winrate: WinRateSection = opt(WinRateSection, "Win-rate of the trained model against the starting model, "
                                                  "judged by a reward model in both answer orders")
    gate_accuracy: Optional[float] = opt(None, "Gate: held-out preference accuracy at least this", range="[0, 1]")
    export_version: Optional[str] = opt(None, "Version tag written into final/MANIFEST.json")


@dataclass
class PPOKLSection:
    estimator: str = opt("k1", "Per-token estimator of KL(π‖π_ref) in the reward: k1 = d, k2 = d²/2, "
                               "k3 = e^-d - 1 + d with d = log π - log π_ref", ["k1", "k2", "k3"])
    controller: str = opt("adaptive", "fixed: β stays; adaptive: β follows the target KL (Ziegler et al. 2019)",
                          ["fixed", "adaptive"])
    init_coef: float = opt(0.05, "Initial β", range="[0, inf)")
    target: float = opt(0.02, "Target per-sequence KL of the adaptive controller (seed: 0.02)", range="(0, inf)")
    horizon: float = opt(10000.0, "Adaptive controller horizon in samples", range="(0, inf)")
    alarm: Optional[float] = opt(0.05, "KL above this raises an alarm and decays the policy lr (seed: 0.05); "
                                       "empty: no alarm", range="(0, inf)")
    lr_decay: float = opt(0.5, "Policy lr factor multiplied by this on each alarm", range="(0, 1]")
    lr_floor: float = opt(0.05, "The policy lr factor never goes below this", range="(0, 1]")


@dataclass
class SafetySection:
    weight: float = opt(0.0, "λ: R_total = R_rm + λ·R_safety (seed: 0.3); 0 disables the safety reward",
                        range="[0, inf)")
    word_list: Optional[str] = opt(None, "Sensitive phrases, one per line: R_safety -= match_weight·min(1, "
                                         "matches / saturation)")
    saturation: int = opt(1, "Matches that give the full penalty", range="[1, inf)")
    match_weight: float = opt(1.0, "Weight of the sensitive-phrase score in R_safety", range="[0, inf)")
    classifier: Optional[str] = opt(None, "Safety classifier (a reward model trained on safe vs unsafe answers): "
                                          "R_safety += classifier_weight·σ(calibrated score)")
    classifier_weight: float = opt(1.0, "Weight of the classifier's P(safe) in R_safety", range="[0, inf)")
    unsafe_tag: str = opt("safety_boundary", "Prompt tag whose held-out completions count toward eval/unsafe_rate")


@dataclass
class AuditSection:
    every: int = opt(0, "Steps per audit round: a share of each round's rollouts goes to audit/round_K.jsonl for "
                        "human review; 0 disables")
    share: float = opt(0.05, "Share of rollouts kept for review (seed: 5%)", range="(0, 1]")
    review_hours: float = opt(48.0, "A round still unreviewed this long after it was written is flagged in the "
                                    "report", range="(0, inf)")


@dataclass
class PPOSection:
    reward_model: Optional[str] = opt(None, "The reward model (an exported reward run)")
    reward_sha256: Optional[str] = opt(None, "Expected model_sha256 of the reward model's MANIFEST.json")
    reward_dtype: str = opt("auto", "dtype the frozen reward model (and safety classifier) is held and computed in, as "
                                    "a FrozenModelSection's dtype: auto = bfloat16 on Ascend, float32 on CPU",
                            ["auto", "float32", "float16", "bfloat16"])
    reference: FrozenModelSection = opt(FrozenModelSection, "The frozen reference; empty: a frozen copy of "
                                        "model.init_from, or with LoRA the policy with its adapter disabled")
    value_init: str = opt("reward", "The value model starts as the reward model (backbone and head) or as the "
                                    "policy's weights with a new head", ["reward", "policy"])
    value_path: Optional[str] = opt(None, "With value_init reward: another reward-model-shaped directory (backbone "
                                          "and reward head) to start the value model from")
    value_lr: Optional[float] = opt(None, "Peak lr of the value model (default optim.lr)", range="(0, inf)")
    lora: LoRASection = opt(LoRASection, "Train LoRA adapters on the policy instead of all weights")
    rollout_batch_size: int = opt(16, "Prompts rolled out per step", range="[1, inf)")
    mini_batch_size: int = opt(8, "Responses per PPO update (dividing rollout_batch_size); each response is "
                                  "scored in ceil(max_new_tokens / chunk_size) windows, and train.micro_batch_size "
                                  "counts windows per forward pass", range="[1, inf)")
    ppo_epochs: int = opt(1, "Passes over each rollout batch", range="[1, inf)")
    max_prompt_len: int = opt(48, "Prompt tokens (longer prompts lose tokens from the start)", range="[1, inf)")
    max_new_tokens: int = opt(32, "Response tokens generated", range="[1, inf)")
    temperature: float = opt(1.0, "Sampling temperature of rollouts (the losses score at the same one)",
                             range="(0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling of rollouts", range="(0, 1]")
    chunk_size: int = opt(2048, "Response tokens generated and scored per chunk (seed: 2048)", range="[1, inf)")
    generation_batch_size: int = opt(0, "Rows decoded at once: a finished row's cache row takes the next prompt "
                                        "(continuous batching; needs chunk_size >= max_new_tokens); 0: every row of this rank's share at once",
                                     range="[0, inf)")
    chunk_overlap: int = opt(256, "Preceding tokens each scoring chunk sees as context (seed: 256)")
    exact_scoring: bool = opt(False, "Score whole rows (full context) instead of chunks")
    gamma: float = opt(1.0, "GAE discount γ", range="[0, 1]")
    lam: float = opt(0.95, "GAE λ", range="[0, 1]")
    whiten_advantages: bool = opt(True, "Whiten advantages over the rollout batch's tokens")
    clip_low: float = opt(0.2, "ε_low: the ratio is clipped below at 1 - ε_low", range="(0, 1)")
    clip_high: float = opt(0.2, "ε_high: the ratio is clipped above at 1 + ε_high", range="(0, inf)")
    dual_clip: float = opt(3.0, "c of dual-clip for negative advantages (> 1); 0 disables", range="[0, inf)")
    value_clip: float = opt(0.2, "Value clipping range around the rollout's values; 0 disables", range="[0, inf)")
    vf_coef: float = opt(0.5, "Value-loss coefficient", range="(0, inf)")
    ent_coef: float = opt(0.01, "Entropy bonus coefficient", range="[0, inf)")
    kl: PPOKLSection = opt(PPOKLSection, "KL penalty coefficient, its controller and the KL alarm")
    safety: SafetySection = opt(SafetySection, "Safety reward (seed 000 §1.2.5.4.4)")
    audit: AuditSection = opt(AuditSection, "Human audit rounds (ms-llm rlhf audit-import adds reviewed problems "
                                            "to the preference pool)")
    fluctuation_gate: float = opt(0.03, "Gate: mean |ratio - 1| per update below this (seed: 3%)", range="(0, inf)")
    eval_data: Optional[str] = opt(None, "Held-out prompts (preference or prompts JSONL): reward-model score of "
                                         "answers sampled as rollouts are (fixed seed) and the unsafe rate on the "
                                         "safety prompts")
    eval_limit: int = opt(64, "Held-out prompts used (0: all)")
    eval_max_new_tokens: int = opt(32, "Tokens per held-out answer", range="[1, inf)")
    export_version: Optional[str] = opt(None, "Version tag written into final/MANIFEST.json")


@dataclass
class DynamicSamplingSection:
    enabled: bool = opt(False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no gradient) and "
                               "sample more prompts until the step has grpo.prompts_per_step groups")
    max_rounds: int = opt(3, "Generation rounds per step at most; a step still short trains on the groups it has",
                          range="[1, inf)")


@dataclass
class OverlongSection:
    buffer: int = opt(0, "DAPO soft overlong punishment: a completion longer than max_new_tokens - buffer loses "
                         "factor·(n - (max_new_tokens - buffer)) / buffer, a truncated one the whole factor; 0 disables",
                      range="[0, inf)")
    factor: float = opt(1.0, "The largest overlong penalty", range="[0, inf)")
    mask_truncated: bool = opt(False, "DAPO overlong filtering: completions cut at max_new_tokens (no end token) "
                                      "add nothing to the loss")


@dataclass
class PartialRolloutSection:
    token_budget: int = opt(0, "Tokens each completion may generate per step; an unfinished one is paused with its "
                               "generation state and continued next step under the newer policy (its tokens keep "
                               "the log-probs of the policy that sampled them); 0: whole completions every step",
                            range="[0, inf)")
    max_staleness: int = opt(1, "Steps a batch may stay paused: at this age it is generated to the end, and "
                                "finished groups older than this are dropped, so no trained token is older",
                             range="[0, inf)")


@dataclass
class AsyncRolloutSection:
    enabled: bool = opt(False, "One-step off-policy: a second process generates step t+1's completions with the "
                               "weights of step t while step t trains (rollout/async_worker.py); synchronous when "
                               "false")
    worker_threads: int = opt(1, "CPU kernel threads of the rollout process (0: MindSpore's default)",
                              range="[0, inf)")
    worker_cores: int = opt(1, "Cores given to the rollout process alone (CPU affinity; the trainer keeps the "
                               "others); 0: both processes may run anywhere", range="[0, inf)")
    trainer_threads: int = opt(1, "CPU kernel threads of the training process while a rollout process shares the "
                                  "cores (0: MindSpore's default)", range="[0, inf)")
    rollout_ranks: int = opt(0, "Under msrun: the last this many ranks generate (rollout/rollout_ranks.py), the "
                                "others train in data parallel, weights and batches passing over collectives; 0: "
                                "one trainer process and a rollout process beside it (CPU)", range="[0, inf)")


@dataclass
class AgentSection:
    tools: Optional[str] = opt(None, "Python source of the tools (functions) episodes may call, run only in the "
                                     "sandbox; set: every completion is a multi-turn tool-using episode whose final "
                                     "answer is rewarded (rollout/agent.py, docs/agent.md)")
    max_turns: int = opt(4, "Model turns per episode at most", range="[1, inf)")
    turn_tokens: int = opt(64, "Tokens per model turn at most; grpo.max_new_tokens bounds the whole episode after "
                               "the prompt (model turns and tool results)", range="[1, inf)")
    turns_per_step: int = opt(0, "Partial rollout by turns: model turns each episode takes per step; unfinished "
                                 "episodes wait (checkpointed) and continue under the next step's policy; 0: whole "
                                 "episodes every step", range="[0, inf)")
    max_staleness: int = opt(1, "With turns_per_step: steps an episode batch may stay paused before it is run out; "
                                "finished groups older than this are dropped", range="[0, inf)")
    tool_timeout: float = opt(5.0, "Seconds per turn's sandboxed tool run", range="(0, inf)")


@dataclass
class GRPOSection:
    group_size: int = opt(8, "G: completions sampled per prompt", range="[1, inf)")
    prompts_per_step: int = opt(8, "Groups (prompts) per step", range="[1, inf)")
    mini_batch_size: int = opt(0, "Completions per optimizer update (0: the whole step's batch, one update); "
                                  "train.micro_batch_size completions per forward pass", range="[0, inf)")
    epochs: int = opt(1, "Passes over each step's batch", range="[1, inf)")
    max_prompt_len: int = opt(48, "Prompt tokens (longer prompts lose tokens from the start)", range="[1, inf)")
    max_new_tokens: int = opt(32, "L: completion tokens at most", range="[1, inf)")
    generation_batch_size: int = opt(0, "Rows decoded at once: a finished row's cache row takes the next prompt "
                                        "(continuous batching); 0: every row of this rank's share at once",
                                     range="[0, inf)")
    temperature: float = opt(1.0, "Sampling temperature (the loss scores at the same one)", range="(0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling of rollouts", range="(0, 1]")
    top_k: int = opt(0, "Top-k sampling of rollouts (0: off)", range="[0, inf)")
    advantage_scale: str = opt("group", "A = (r - group mean) / std: std of the group (GRPO), of the whole batch, or "
                                        "no division (Dr. GRPO)", ["group", "batch", "none"])
    advantage_eps: float = opt(1e-6, "ε added to the std", range="(0, inf)")
    loss_agg: str = opt("seq-mean-token-mean", "Loss aggregation over the global batch: token-mean (DAPO), "
                                               "seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO: token "
                                               "sums over max_new_tokens)",
                        ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    ratio: str = opt("token", "Importance ratio per token (GRPO, DAPO) or per sequence, exp(mean log-ratio) (GSPO)",
                     ["token", "sequence"])
    clip_low: float = opt(0.2, "ε_low: the ratio is clipped below at 1 - ε_low (GSPO: 3e-4)", range="(0, 1)")
    clip_high: float = opt(0.2, "ε_high: clipped above at 1 + ε_high (DAPO clip-higher: 0.28; GSPO: 4e-4)",
                           range="(0, inf)")
    dual_clip: float = opt(0.0, "c of dual-clip for negative advantages (> 1); 0 disables", range="[0, inf)")
    beta: float = opt(0.0, "β of the k3 KL to the reference in the loss; 0 loads no reference model",
                      range="[0, inf)")
    ent_coef: float = opt(0.0, "Entropy bonus coefficient", range="[0, inf)")
    reference: FrozenModelSection = opt(FrozenModelSection, "The frozen reference (β > 0); empty: a frozen copy of "
                                        "model.init_from, or with LoRA the policy with its adapter disabled")
    lora: LoRASection = opt(LoRASection, "Train LoRA adapters on the policy instead of all weights")
    rewards: dict = opt(lambda: {"exact_match": 1.0}, "Reward functions and their weights: exact_match, code "
                                                      "(sandboxed tests), format (<think>…</think> then an answer), "
                                                      "reward_model")
    answer_style: str = opt("auto", "exact_match answer extraction (eval/generative.py:extract_answer); math: "
                                    "equivalence judged by math-verify (pip install 'ms_llm[math]')",
                            ["auto", "number", "text", "math"])
    reward_model: Optional[str] = opt(None, "Reward model for the reward_model reward (an exported reward run)")
    reward_dtype: str = opt("auto", "dtype the frozen reward model (and safety classifier) is held and computed in, as "
                                    "a FrozenModelSection's dtype: auto = bfloat16 on Ascend, float32 on CPU",
                            ["auto", "float32", "float16", "bfloat16"])
    reward_sha256: Optional[str] = opt(None, "Expected model_sha256 of grpo.reward_model's manifest (set by the "
                                              "pipeline's hand-off); a mismatch refuses to start")
    code_timeout: float = opt(3.0, "Seconds per sandboxed code check", range="(0, inf)")
    unsafe_no_isolation: bool = opt(False, "Run code rewards without the namespace sandbox (docs/eval.md)")
    tasks: list = opt(list, "Train and evaluate only prompts whose task is one of these (empty: all)")
    dynamic_sampling: DynamicSamplingSection = opt(DynamicSamplingSection, "DAPO dynamic sampling")
    overlong: OverlongSection = opt(OverlongSection, "DAPO overlong reward shaping and filtering")
    partial_rollout: PartialRolloutSection = opt(PartialRolloutSection, "Partial rollouts across steps")
    async_rollout: AsyncRolloutSection = opt(AsyncRolloutSection, "Asynchronous one-step off-policy rollouts")
    agent: AgentSection = opt(AgentSection, "Agentic RL: completions are tool-using episodes")
    eval_data: Optional[str] = opt(None, "Held-out prompts JSONL ({prompt, answer, task[, tests]}): eval/accuracy of "
                                         "greedy answers (exact match; code answers run their tests)")
    eval_limit: int = opt(0, "Held-out prompts used (0: all)")
    export_version: Optional[str] = opt(None, "Version tag written into final/MANIFEST.json")


@dataclass
class MupSection:
    enabled: bool = opt(False, "Train in μP (models/mup.py): hyperparameters tuned at base_width transfer to this width")
    base_width: int = opt(256, "hidden_size of the proxy model the hyperparameters were tuned on", range="[1, inf)")
    lr_exponent: float = opt(1.0, "α: hidden matrices get lr x (base_width / hidden_size)^α; 1 is μP, the seed fitted "
                                  "0.85 (seed 000 §1.2.5.2.3)", range="[0, 2]")
    embedding_multiplier: float = opt(1.0, "Token embeddings are multiplied by this (MiniCPM uses 12)", range="(0, inf)")
    output_multiplier: float = opt(1.0, "Logits are multiplied by this x base_width / hidden_size", range="(0, inf)")
    zero_readout: bool = opt(True, "Start an untied lm_head at zero (μP advice); models not loaded with init_from")
    init_std: Optional[float] = opt(None, "σ of the proxy: hidden matrices start at σ/√m (default: the model's "
                                          "initializer_range); only for models not loaded with init_from", range="(0, inf)")


@dataclass
class PlanSection:
    shapes: dict = opt(dict, "Model shapes `ms-llm plan` uses when a model's directory is not on this machine (planning "
                             "before the weights are there): {config key: preset}, e.g. {model: qwen2.5-7b, "
                             "ppo.reward_model: qwen2.5-0.5b, distill.teacher: qwen2.5-72b}")
    nproc_per_node: int = opt(1, "Ranks per node the config is meant for (ms-llm plan's default --nproc-per-node)",
                              range="[1, inf)")
    nnodes: int = opt(1, "Nodes the config is meant for (ms-llm plan's default --nnodes)", range="[1, inf)")


@dataclass
class ExperimentConfig:
    stage: str = opt("pretrain", "Which stage runs (what each supports: config/validate.py STAGE_RULES)",
                     list(STAGE_NAMES))
    model: ModelSection = opt(ModelSection, "Model")
    tokenizer: TokenizerSection = opt(TokenizerSection, "Tokenizer")
    data: DataSection = opt(DataSection, "Data")
    train: TrainSection = opt(TrainSection, "Training loop")
    optim: OptimSection = opt(OptimSection, "Optimizer")
    lr_schedule: LRScheduleSection = opt(LRScheduleSection, "Learning-rate schedule")
    checkpoint: CheckpointSection = opt(CheckpointSection, "Checkpoints")
    parallel: ParallelSection = opt(ParallelSection, "Parallelism")
    context: ContextSection = opt(ContextSection, "MindSpore context")
    log: LogSection = opt(LogSection, "Logging")
    pretrain: PretrainSection = opt(PretrainSection, "Pretraining stage")
    sft: SFTSection = opt(SFTSection, "Supervised fine-tuning stage")
    distill: DistillSection = opt(DistillSection, "Logit distillation stage")
    cpt: CPTSection = opt(CPTSection, "Continual pretraining stage")
    reward: RewardSection = opt(RewardSection, "Reward-model stage")
    dpo: DPOSection = opt(DPOSection, "Preference-optimisation stage (DPO family, KTO)")
    ppo: PPOSection = opt(PPOSection, "PPO-RLHF stage (policy, reference, value and reward models)")
    grpo: GRPOSection = opt(GRPOSection, "GRPO-family stage (GRPO, Dr. GRPO, DAPO, GSPO) with verifiable rewards")
    mup: MupSection = opt(MupSection, "μP width-transfer parametrization (any stage that trains the whole model)")
    plan: PlanSection = opt(PlanSection, "Memory planning (`ms-llm plan`, ms_llm/plan.py)")

    @property
    def packing(self) -> Optional[str]:
        """How this stage packs its data: None (no packing), "documents" (rows of several documents, attention
        within each) or "concatenated" (documents run on into each other: data.document_mask false)."""
        on = self.data.packing if self.data.packing is not None else self.stage in PACKING_STAGES
        return None if not on else "documents" if self.data.document_mask else "concatenated"

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.parallel.data_parallel
