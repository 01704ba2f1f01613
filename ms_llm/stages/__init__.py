# SPDX-License-Identifier: Apache-2.0
"""One module per stage; STAGES maps the config's `stage:` value to its `run(cfg)` function."""
from ms_llm.stages import pretrain, sft

STAGES = {"pretrain": pretrain.run, "sft": sft.run}
