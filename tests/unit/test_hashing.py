"""Build records hash a checkpoint that is a file or a folder (a transformers save_pretrained directory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from detserve.hashing import checkpoint_sha256, file_sha256, folder_sha256


def test_a_file_hashes_its_bytes(tmp_path: Path) -> None:
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights" * 1000)
    assert file_sha256(f) == checkpoint_sha256(f) == hashlib.sha256(b"weights" * 1000).hexdigest()


def test_a_folder_hashes_names_and_contents_in_a_fixed_order(tmp_path: Path) -> None:
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "config.json").write_text("{}")
    (a / "sub" / "model.safetensors").write_bytes(b"\x00" * 10)
    digest = checkpoint_sha256(a)
    assert digest == folder_sha256(a)
    # the same files written in another order give the same hash
    b = tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    (b / "sub" / "model.safetensors").write_bytes(b"\x00" * 10)
    (b / "config.json").write_text("{}")
    assert checkpoint_sha256(b) == digest
    # a changed byte, a renamed file or an added file changes it
    (b / "config.json").write_text("{ }")
    assert checkpoint_sha256(b) != digest
    (b / "config.json").write_text("{}")
    (b / "sub" / "model.safetensors").rename(b / "sub" / "other.safetensors")
    assert checkpoint_sha256(b) != digest
    (b / "sub" / "other.safetensors").rename(b / "sub" / "model.safetensors")
    assert checkpoint_sha256(b) == digest
    (b / "extra.txt").write_text("x")
    assert checkpoint_sha256(b) != digest


def test_the_calibration_key_keeps_its_formula(tmp_path: Path) -> None:
    """TensorRT calibration caches written before file_sha256 was shared stay valid: same per-file digest."""
    from converters.tensorrt_calibration import files_digest

    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for k, f in enumerate(files):
        f.write_bytes(bytes([k]) * (3 << 20))  # larger than file_sha256's 1 MiB chunk
    before = hashlib.sha256()
    for f in files:
        before.update(f.name.encode())
        before.update(hashlib.sha256(f.read_bytes()).digest())
    assert files_digest(files) == before.hexdigest()
