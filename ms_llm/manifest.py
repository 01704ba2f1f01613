# SPDX-License-Identifier: Apache-2.0
"""MANIFEST.json: the SHA256 of every file in a folder, for checkpoints, exported models, caches and dataset
releases alike.

    {"ms_llm_version", "version", "created", "files": {name: sha256}, "model_sha256"?, ...extra}

`write_manifest` hashes a folder's files (written last, atomically); `verify` checks them and names the first
bad one; `model_sha256` (a hash over the weight files' hashes) is a model's identity in stage hand-offs;
`verify_dataset` checks a dataset release and returns what a run binds to.
"""
import hashlib
import json
import os
import re
import time

from ms_llm import __version__
from ms_llm.errors import MsLlmError
from ms_llm.fileio import fsync_dir, read_json, sha256_file, write_json_atomic

WEIGHT_FILES = re.compile(r".*\.safetensors(\.index\.json)?$")


def _walk(folder: str, sub: str = ""):
    """Relative paths ("a/b.json") of every file under folder, sorted, subfolders included."""
    for n in sorted(os.listdir(os.path.join(folder, sub))):
        rel = f"{sub}/{n}" if sub else n
        if os.path.isdir(os.path.join(folder, rel)):
            yield from _walk(folder, rel)
        elif os.path.isfile(os.path.join(folder, rel)):
            yield rel


def write_manifest(folder: str, version: str = None, extra: dict = None, recursive: bool = False) -> dict:
    """Hash every file in `folder` — with `recursive`, in its subfolders too (a checkpoint's further models) —
    into MANIFEST.json (written atomically); returns the manifest."""
    names = _walk(folder) if recursive else (n for n in sorted(os.listdir(folder))
                                             if os.path.isfile(os.path.join(folder, n)))
    files = {n: sha256_file(os.path.join(folder, n)) for n in names if n != "MANIFEST.json" and ".tmp." not in n}
    manifest = {"ms_llm_version": __version__, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files, **(extra or {})}
    if any(WEIGHT_FILES.match(n) and "/" not in n for n in files):
        manifest["model_sha256"] = model_hash(files)
    write_json_atomic(os.path.join(folder, "MANIFEST.json"), manifest)
    fsync_dir(folder)
    return manifest


def model_hash(files: dict) -> str:
    """The model's identity for stage hand-off: SHA256 over the hashes of its weight files (top level only:
    a checkpoint's further models live in subfolders and have identities of their own)."""
    weights = {k: v for k, v in files.items() if WEIGHT_FILES.match(k) and "/" not in k and not k.startswith("optimizer")}
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def _check_files(manifest_path: str, files: dict, hint: str):
    """Every file listed (relative to the manifest's folder) exists with its SHA256; else name the first bad one."""
    folder = os.path.dirname(os.path.abspath(manifest_path))
    for name, want in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise MsLlmError(f"{path}: listed in {manifest_path} but missing")
        got = sha256_file(path)
        if got != want:
            raise MsLlmError(f"{path}: SHA256 {got[:16]}... does not match {os.path.basename(manifest_path)} "
                             f"({want[:16]}...); {hint}")


def verify(folder: str) -> dict:
    """Check every file against the folder's MANIFEST.json; raises MsLlmError naming the first bad file."""
    path = os.path.join(folder, "MANIFEST.json")
    manifest = read_json(path, "the manifest")
    _check_files(path, manifest["files"], "the file is corrupt — restore it or resume from another checkpoint")
    return manifest


def verify_dataset(manifest_path: str, expected_version: str = None, key: str = "sft.dataset_version") -> dict:
    """Check every listed file's SHA256 and the version tag; returns {"version", "sha256"} (of the manifest)."""
    manifest = read_json(manifest_path, "a dataset manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise MsLlmError(f"{manifest_path}: not a dataset manifest with a 'files' table")
    if expected_version and manifest.get("version") != expected_version:
        raise MsLlmError(f"{manifest_path}: version {manifest.get('version')!r} but {key} expects "
                         f"{expected_version!r}")
    _check_files(manifest_path, files, "the dataset changed since its release")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"version": manifest.get("version"), "sha256": digest}


def model_identity(model_dir: str) -> str:
    """The model's MANIFEST model_sha256 when it has one, else the SHA256 of its weights file(s)."""
    manifest = os.path.join(model_dir, "MANIFEST.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            return json.load(f).get("model_sha256", "")
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    return sha256_file(os.path.join(model_dir, files[0])) if len(files) == 1 else ",".join(files)
