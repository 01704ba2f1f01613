# SPDX-License-Identifier: Apache-2.0
"""DPO against Hugging Face TRL: the same tiny Llama, the same pre-tokenized pairs in the same order and the same
optimizer settings give the same per-step losses for 10 steps (<= 1e-4).

The TRL release that installs beside mindformers 1.8 (0.29.1: newer ones need a pyarrow that mindformers pins
below) always re-tokenizes text columns in `_prepare_dataset`; the test's trainer subclass returns the
pre-tokenized dataset from it unchanged and reads the batches in order (TRL shuffles by default). Nothing else
of TRL is replaced: its collator, forward pass, reference model, loss, AdamW and clipping run as shipped.
TRL's configs default to bf16 autocast where the CPU has it; both sides run float32 here."""
import numpy as np
import pytest

from conftest import make_hf_model

STEPS, BATCH, LR, BETA = 10, 4, 1e-3, 0.1


def _pairs(n, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append({"prompt_ids": rng.integers(3, vocab, rng.integers(3, 9)).tolist(),
                    "chosen_ids": rng.integers(3, vocab, rng.integers(2, 8)).tolist(),
                    "rejected_ids": rng.integers(3, vocab, rng.integers(2, 8)).tolist()})
    return out


def _trl_losses(model_dir, pairs, out_dir):
    import datasets
    import torch
    import transformers
    from tokenizers import Tokenizer, models
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class InOrder(DPOTrainer):
        losses = []

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset                                   # already tokenized

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float(loss.detach()))
            return loss

    vocab = {f"t{i}": i for i in range(256)}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                               pad_token="t0", eos_token="t1", unk_token="t2")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                     lr_scheduler_type="constant", beta=BETA, loss_type="sigmoid", logging_steps=1, report_to=[],
                     seed=0, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                     use_cpu=True, bf16=False, fp16=False, save_strategy="no", dataloader_drop_last=True, max_length=None)
    trainer = InOrder(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs), processing_class=tok)
    trainer.train()
    return trainer.losses


def _ms_losses(model_dir, pairs, tmp_path):
    from mindspore import Tensor
    from ms_llm.config import load_config
    from ms_llm.losses.dpo import PreferenceLoss
    from ms_llm.models import load_pretrained
    from ms_llm.models.frozen import freeze
    from ms_llm.stages.dpo import SequenceScorer
    from ms_llm.training.updater import Updater
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), [f"optim.lr={LR}", "optim.beta1=0.9", "optim.beta2=0.999",
                                                 "optim.eps=1e-8", "optim.weight_decay=0", "lr_schedule.type=constant",
                                                 "train.clip_grad_norm=1.0", f"train.max_steps={STEPS}",
                                                 "train.loss_scale=none"])
    policy = load_pretrained(model_dir)
    reference = SequenceScorer(freeze(load_pretrained(model_dir)))
    updater = Updater("policy", cfg, PreferenceLoss(policy, "sigmoid", BETA), policy)
    width = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)

    def rows(batch, side):
        ids = np.zeros((len(batch), width), np.int32)
        labels = np.full((len(batch), width), -100, np.int32)
        for i, p in enumerate(batch):
            seq = p["prompt_ids"] + p[f"{side}_ids"]
            ids[i, :len(seq)] = seq
            labels[i, len(p["prompt_ids"]) - 1:len(seq) - 1] = p[f"{side}_ids"]
        return ids, labels

    losses = []
    for step in range(STEPS):
        batch = pairs[step * BATCH:(step + 1) * BATCH]
        (ci, cl), (ri, rl) = rows(batch, "chosen"), rows(batch, "rejected")
        ref = reference(Tensor(np.concatenate([ci, ri])), Tensor(np.concatenate([cl, rl]))).asnumpy()
        out = updater([tuple(Tensor(x) for x in (ci, cl, ri, rl, ref[:BATCH], ref[BATCH:]))], step)
        losses.append(out["loss"])
    return losses


@pytest.mark.slow
def test_per_step_losses_equal_trl_dpo_trainer(tmp_path):
    model_dir = tmp_path / "hf"
    make_hf_model("llama", model_dir, tie_word_embeddings=False)
    pairs = _pairs(STEPS * BATCH)
    theirs = _trl_losses(str(model_dir), pairs, tmp_path / "trl")
    ours = _ms_losses(str(model_dir), pairs, tmp_path)
    assert len(theirs) == STEPS and theirs[0] == pytest.approx(np.log(2), abs=1e-6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    print("max per-step loss difference vs TRL:", float(np.abs(np.subtract(ours, theirs)).max()))
    assert theirs[-1] < theirs[0] - 0.02                               # they trained, not sat at ln 2
