# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind `ms-llm bench <name>`: each prints its figures, measured side by side in one run."""
