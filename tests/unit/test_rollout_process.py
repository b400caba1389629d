"""A promote run as a container's PID 1 (a Kubernetes Job): SIGTERM runs the same undo as Ctrl-C, and
the repository files it rewrites on a shared volume are replaced whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from detserve.ops.rollout import replace_file

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_reaches_a_promote_as_keyboard_interrupt() -> None:
    script = (
        "import os, signal, sys\n"
        "from detserve.app.cli_base import terminate_as_interrupt\n"
        "terminate_as_interrupt()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
        "except KeyboardInterrupt:\n"
        "    print('undo ran')\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (3, "undo ran"), proc.stderr


def test_promote_and_rollback_install_the_handler() -> None:
    source = (ROOT / "detserve" / "app" / "cli_ops.py").read_text()
    for command in ("def promote(", "def rollback("):
        body = source[source.index(command) :].split("\n@app", 1)[0]
        assert "terminate_as_interrupt()" in body, command


def test_a_config_is_replaced_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "old"\n')
    replace_file(config, 'name: "new"\n')
    assert config.read_text() == 'name: "new"\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]
