# SPDX-License-Identifier: Apache-2.0
"""Evaluation: multiple choice, HumanEval in a sandbox, perplexity, exact match, win-rate; JSON + markdown results."""
