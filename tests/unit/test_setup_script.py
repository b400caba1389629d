"""scripts/setup.sh stops only the nginx service its install started, never nginx processes by name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def test_setup_kills_no_process_by_name() -> None:
    text = SETUP.read_text()
    assert not re.search(r"\b(pkill|killall)\b", text), "setup.sh must not kill processes by name (other users' nginx)"
    assert "/run/nginx.pid" in text  # the packaged service's own master


def test_setup_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
