"""promote without an admin key says what to do, including for a server started without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from detserve.ops.versions import VersionError, promote


def test_promote_without_key_says_to_restart_a_keyless_server(tmp_path: Path) -> None:
    with pytest.raises(VersionError) as info:
        promote("127.0.0.1:1", None, tmp_path, "demo", 2)
    hint = info.value.hint or ""
    assert "restart" in hint and "DETSERVE_ADMIN_KEY" in hint and "DETSERVE_ADMIN_KEY_FILE" in hint
    assert "the key the server was started with" not in hint
