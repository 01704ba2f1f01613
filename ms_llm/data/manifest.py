# SPDX-License-Identifier: Apache-2.0
"""Dataset version binding: a release's MANIFEST.json ({"version", "files": {name: sha256}}) is verified
and its identity recorded in the run, so a resume on different data is refused (seed 000 §1.2.5.3.1)."""
import hashlib
import json
import os

from ms_llm.errors import MsLlmError
from ms_llm.fileio import sha256_file


def verify_dataset(manifest_path: str, expected_version: str = None, key: str = "sft.dataset_version") -> dict:
    """Check every listed file's SHA256 and the version tag; returns {"version", "sha256"} (of the manifest)."""
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise MsLlmError(f"{manifest_path}: not a dataset manifest with a 'files' table ({e})") from None
    if expected_version and manifest.get("version") != expected_version:
        raise MsLlmError(f"{manifest_path}: version {manifest.get('version')!r} but {key} expects "
                         f"{expected_version!r}")
    folder = os.path.dirname(os.path.abspath(manifest_path))
    for name, want in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise MsLlmError(f"{path}: listed in {manifest_path} but missing")
        if sha256_file(path) != want:
            raise MsLlmError(f"{path}: SHA256 differs from {manifest_path}; the dataset changed since its release")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"version": manifest.get("version"), "sha256": digest}
