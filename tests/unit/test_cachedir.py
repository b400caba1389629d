"""The backend directory and the stubs' prefix go to a per-user cache, never into sys.prefix."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from detserve.errors import ServerError
from detserve.ops.embedded import backend_directory, stub_prefix


def test_backend_files_go_to_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    backends = backend_directory()
    prefix = stub_prefix()
    root = tmp_path / "cache" / "detserve"
    assert root in backends.parents and root in prefix.parents
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert (prefix / "bin" / "python3").resolve() == Path(sys.executable).resolve()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert not str(backends).startswith(sys.prefix)


def test_an_unwritable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # a path under a file: nobody can create it
    with pytest.raises(ServerError, match="not writable") as info:
        backend_directory()
    assert "XDG_CACHE_HOME" in (info.value.hint or "")
