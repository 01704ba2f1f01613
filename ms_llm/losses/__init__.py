# SPDX-License-Identifier: Apache-2.0
"""One module per training objective; each loss cell returns (numerator, denominator) for the train step."""
