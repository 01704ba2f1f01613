# SPDX-License-Identifier: Apache-2.0
"""What msrun starts on every worker: `msrun ... scripts/train.py CONFIG [section.key=value ...]`.

Use `ms-llm launch` (or scripts/msrun_launcher.sh) to build the msrun command; see docs/launch.md.
"""
import sys

from ms_llm.launch import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
