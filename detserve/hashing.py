"""Content hashes that build records and caches use: one file, or a checkpoint folder as a whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(path: str | Path) -> str:
    """sha256 over a folder's files: each relative name (POSIX form, sorted) and the sha256 of its bytes.

    Deterministic across machines and file-system orders; a renamed, added, removed or changed file
    changes it. Used for checkpoints that are folders (a transformers ``save_pretrained`` directory).
    """
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(file)))
    return h.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """The hash a build record keeps for ``--checkpoint``: a file's bytes, or a folder's names and contents."""
    return folder_sha256(path) if Path(path).is_dir() else file_sha256(path)
