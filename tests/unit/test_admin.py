"""Admin key rules (the same as docker/entrypoint.sh's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detserve.ops.admin import AdminKeyError, admin_key
from detserve.ops.status import BuildSummary, parse_pending

KEY = "0123456789abcdef-._~XYZ"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETSERVE_ADMIN_KEY", raising=False)
    monkeypatch.delenv("DETSERVE_ADMIN_KEY_FILE", raising=False)


def test_no_key_configured_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert admin_key() is None
    monkeypatch.setenv("DETSERVE_ADMIN_KEY", "")
    assert admin_key() is None


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETSERVE_ADMIN_KEY", KEY)
    assert admin_key() == KEY


@pytest.mark.parametrize(
    "bad", ["short", "x" * 15, "has space in it 123", "quote'd-0123456789", "semi;colon0123456789", "é" * 20]
)
def test_invalid_keys_are_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("DETSERVE_ADMIN_KEY", bad)
    with pytest.raises(AdminKeyError, match="DETSERVE_ADMIN_KEY is not valid") as e:
        admin_key()
    assert e.value.hint and "16 characters" in e.value.hint
    assert bad not in e.value.message  # the message never echoes a key


def test_variable_wins_file_loses_its_line_ending(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The entrypoint's rule: the variable wins, the file is read only when it is empty."""
    path = tmp_path / "admin-key"
    path.write_text("fromfile-0123456789\r\n")
    path.chmod(0o600)  # a key file others can read is refused
    monkeypatch.setenv("DETSERVE_ADMIN_KEY", KEY)
    monkeypatch.setenv("DETSERVE_ADMIN_KEY_FILE", str(path))
    assert admin_key() == KEY
    monkeypatch.setenv("DETSERVE_ADMIN_KEY", "")
    assert admin_key() == "fromfile-0123456789"


def test_unreadable_or_invalid_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DETSERVE_ADMIN_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(AdminKeyError, match="is not a readable file"):
        admin_key()
    (tmp_path / "short").write_text("short\n")
    (tmp_path / "short").chmod(0o600)
    monkeypatch.setenv("DETSERVE_ADMIN_KEY_FILE", str(tmp_path / "short"))
    with pytest.raises(AdminKeyError, match="not valid"):
        admin_key()


def test_custom_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", KEY)
    assert admin_key(env_var="MY_KEY", file_env="MY_KEY_FILE") == KEY


def test_parse_pending_from_prometheus_text() -> None:
    text = (
        "# HELP nv_inference_pending_request_count Instantaneous number\n"
        "# TYPE nv_inference_pending_request_count gauge\n"
        'nv_inference_pending_request_count{model="a_core",version="1"} 3\n'
        'nv_inference_pending_request_count{model="a",version="2"} 0\n'
        'nv_inference_queue_duration_us{model="a",version="1"} 77\n'
    )
    assert parse_pending(text) == {("a_core", "1"): 3, ("a", "2"): 0}


def test_build_summary_from_a_record() -> None:
    record = {
        "detector": "ssd300_vgg16", "weights": "checkpoint", "checkpoint_sha256": "ab" * 32, "precision": "fp16",
        "verification": {"core": {"ok": True}, "ok": True}, "built_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    summary = BuildSummary.from_record(record)
    assert summary.checkpoint_sha256 == "ab" * 6 and summary.verified is True and summary.precision == "fp16"
    assert BuildSummary.from_record({"verification": {"core": None, "ok": True}}).verified is None
