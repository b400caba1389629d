"""Run a Python snippet as another local user (``nobody``): the hostile local user of issue 10.

The test runner is root; the child drops to ``nobody`` before it runs. It needs an interpreter
that ``nobody`` may execute: this one when its directories are readable, else the system's
python3 of the same minor version, with this virtualenv's site-packages on its path (read-only
use). Tests skip with the reason when neither works (not root, no such interpreter).
"""

from __future__ import annotations

import json
import os
import pwd
import site
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER = "nobody"


def _env() -> dict[str, str]:
    paths = [str(ROOT), *site.getsitepackages()]
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(paths), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}


@cache
def interpreter() -> str | None:
    """A python that ``nobody`` can run with our packages, or None."""
    if os.geteuid() != 0:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            proc = subprocess.run(
                [candidate, "-c", "import tritonclient.grpc, numpy"],
                user=USER,
                group=pwd.getpwnam(USER).pw_gid,
                extra_groups=[],
                env=_env(),
                capture_output=True,
                timeout=60,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0:
            return candidate
    return None


def run_as_nobody(code: str, timeout_s: float = 120.0, **values: Any) -> Any:
    """Run ``code`` as nobody with ``values`` in ``ARGS``; it prints one JSON line last: returned.

    ``values`` travel on the child's standard input, not its command line (they may hold the secret
    the child searches every command line for).
    """
    python = interpreter()
    if python is None:
        pytest.skip("needs root and a python that the user nobody can run (this one, or /usr/bin/python3.X)")
    script = f"import json, sys\nARGS = json.loads(sys.stdin.readline())\n{code}"
    proc = subprocess.run(
        [python, "-c", script],
        input=json.dumps(values) + "\n",
        user=USER,
        group=pwd.getpwnam(USER).pw_gid,
        extra_groups=[],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd="/",
    )
    assert proc.returncode == 0, f"as {USER}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
