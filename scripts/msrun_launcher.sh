#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Launch a config with msrun; every option is a named flag (see `ms-llm launch --help`, docs/launch.md).
#   scripts/msrun_launcher.sh configs/qwen2.5/0.5b_pretrain.yaml --nproc-per-node 8 --device ascend
set -euo pipefail
exec python -m ms_llm.cli launch "$@"
