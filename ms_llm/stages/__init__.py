# SPDX-License-Identifier: Apache-2.0
"""One module per stage; STAGES maps the config's `stage:` value to its `run(cfg)` function."""
from ms_llm.stages import cpt, distill, pretrain, reward, sft

STAGES = {"pretrain": pretrain.run, "cpt": cpt.run, "distill": distill.run, "sft": sft.run, "reward": reward.run}
