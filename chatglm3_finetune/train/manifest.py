"""The manifest of a saved folder (a checkpoint, or the final model in the output folder): every file
written, with its size and an xxh3-128 checksum, written last. A folder is complete only when its
manifest is there and every file it lists matches it: a save interrupted before the manifest, a file
removed, truncated, zeroed or rewritten afterwards all show.

xxh3 runs at memory speed (several GB/s per core), so hashing the whole of every file costs about
what reading it does; checkpoints that are resumed from are read in full anyway. A sampled checksum
would be cheaper still but would miss damage between its samples.
"""

from __future__ import annotations

import json
import os

import xxhash

MANIFEST_FILE = "manifest.json"
ALGORITHM = "xxh3_128"
BLOCK_SIZE = 8 << 20


class ManifestError(ValueError):
    """A folder that is not complete: its manifest is missing or a file does not match it."""


def file_checksum(path: str) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(BLOCK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def folder_files(folder: str) -> list[str]:
    """Every file under `folder` (relative paths, sorted), the manifest itself left out."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != MANIFEST_FILE:
                found.append(relative)
    return sorted(found)


def describe(folder: str, names: list[str] | None = None) -> dict:
    """{relative path: {"size", ALGORITHM}} for `names` (default: every file in `folder`)."""
    return {name: {"size": os.path.getsize(os.path.join(folder, name)),
                   ALGORITHM: file_checksum(os.path.join(folder, name))}
            for name in (folder_files(folder) if names is None else names)}


def write_manifest(folder: str, step: int | None, files: dict | None = None) -> str:
    """Writes `folder`/manifest.json (aside, then renamed) describing `files` (default: every file in
    the folder now). Call it after everything else in the folder is written."""
    manifest = {"algorithm": ALGORITHM, "global_step": step, "files": describe(folder) if files is None else files}
    path = os.path.join(folder, MANIFEST_FILE)
    aside = f"{path}.{os.getpid()}.tmp"
    with open(aside, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(aside, path)
    return path


def read_manifest(folder: str) -> dict:
    """The manifest of `folder`; ManifestError when there is none or it cannot be read."""
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict) or manifest.get("algorithm") != ALGORITHM:
            raise ValueError("not a manifest of this toolkit")
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST_FILE}: its save did not complete") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ManifestError(f"{MANIFEST_FILE} is unreadable ({e})") from None
    return manifest


def check_folder(folder: str) -> dict:
    """The manifest of `folder` when every file it lists is there with its size and checksum;
    ManifestError naming the first file that is not."""
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ManifestError(f"{name} is missing") from None
        if size != expected["size"]:
            raise ManifestError(f"{name} has {size:,} bytes where {expected['size']:,} were written")
        try:
            checksum = file_checksum(path)
        except OSError as e:
            raise ManifestError(f"{name} cannot be read ({e.strerror or e})") from None
        if checksum != expected[ALGORITHM]:
            raise ManifestError(f"{name} does not hold what was written (its checksum differs)")
    return manifest


def folder_problem(folder: str) -> str | None:
    """None for a complete folder, else what is wrong with it (one phrase)."""
    try:
        check_folder(folder)
    except ManifestError as e:
        return str(e)
    return None
