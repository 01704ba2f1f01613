# SPDX-License-Identifier: Apache-2.0
"""Small file helpers shared by data, checkpoints and exports: content hashes and atomic writes."""
import hashlib
import json
import os

from ms_llm.errors import MsLlmError


def sha256_file(path: str) -> str:
    """Hex SHA256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str, what: str = "file"):
    """Parse a JSON file; a missing or malformed file is an MsLlmError naming it (and `what` it should be)."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise MsLlmError(f"{path}: cannot read {what} ({e.strerror})") from None
    except ValueError as e:
        raise MsLlmError(f"{path}: {what} is not valid JSON ({e})") from None


class NotUtf8(ValueError):
    """A line (or file) that does not decode as UTF-8: reported, or skipped, like a malformed line."""


def numbered_lines(path: str):
    """(line number, raw bytes, byte offset) of each line of `path`; decode each with `utf8` inside the caller's
    error handling, so a binary file or a stray byte is one `file:line` message (or a skipped line)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw, offset
            offset += len(raw)


def utf8(raw: bytes, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8(f"not UTF-8 text (byte {offset + e.start} is {raw[e.start:e.start + 1].hex()}; "
                      "a binary file or another encoding?)") from None


def read_text(path: str, what: str = "file") -> str:
    """A whole UTF-8 text file (configs, pipelines, CSV); a missing or undecodable file is an MsLlmError that
    names it, and the line and byte where decoding failed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MsLlmError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MsLlmError(f"{path}:{line}: {what} is not UTF-8 text (byte {e.start} is "
                         f"{data[e.start:e.start + 1].hex()}; a binary file or another encoding?)") from None


def read_jsonl(path: str) -> list:
    """Every non-empty line of a JSONL file the project wrote itself, parsed (the file is closed after)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json_atomic(path: str, obj, indent: int = 1):
    """Write JSON to a temp file, fsync it and rename it over `path` (readers never see half a file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str):
    """Persist a directory entry change (a rename into `path`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
