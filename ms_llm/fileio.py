# SPDX-License-Identifier: Apache-2.0
"""Small file helpers shared by data, checkpoints and exports: content hashes and atomic writes."""
import hashlib
import json
import os


def sha256_file(path: str) -> str:
    """Hex SHA256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str, what: str = "file"):
    """Parse a JSON file; a missing or malformed file is an MsLlmError naming it (and `what` it should be)."""
    from ms_llm.errors import MsLlmError
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise MsLlmError(f"{path}: cannot read {what} ({e.strerror})") from None
    except ValueError as e:
        raise MsLlmError(f"{path}: {what} is not valid JSON ({e})") from None


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
