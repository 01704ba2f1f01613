# SPDX-License-Identifier: Apache-2.0
"""The one exception type for user-facing errors.

Anything a user can fix (a bad config key, a malformed file, a missing shard) raises `MsLlmError` with a
sentence that names the file, line or key and what to do. The CLI prints it and exits with code 2.
Internal bugs raise ordinary exceptions and keep their tracebacks.
"""


class MsLlmError(Exception):
    """A problem with the user's input, config or files; the message says what and where."""
