"""Run a Python snippet as another local user (``nobody``): the hostile local user of issue 10.

The test runner is root; the child drops to ``nobody`` before it runs. It needs an interpreter
that ``nobody`` may execute: this one when its directories are readable, else the system's
python3 of the same minor version, with this virtualenv's site-packages on its path (read-only
use: copied world-readable, see ``_readable_packages``). Tests skip with the reason when neither works
(not root, no such interpreter).
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

USER = "nobody"


_PROBE = (
    "import sys, json, tritonclient.grpc, numpy\n"
    "paths = {m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)}\n"
    "print(json.dumps(sorted(paths)))"
)


@cache
def _readable_packages() -> str:
    """A world-readable copy of the installed packages the hostile scripts import (tritonclient, numpy
    and what they pull in): the checkout and the virtualenv may sit where ``nobody`` cannot read
    (a 0700 temporary directory, /root), which would skip these tests for the wrong reason."""
    files = json.loads(subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout)
    sites = sorted((Path(d) for d in site.getsitepackages()), key=lambda d: -len(str(d)))
    tops: set[Path] = set()
    for f in map(Path, files):
        site_dir = next((d for d in sites if d in f.parents), None)
        if site_dir is not None:
            tops.add(site_dir / f.relative_to(site_dir).parts[0])
    tops |= {lib for d in sites for lib in d.glob("*.libs") if any(t.name.startswith(lib.name[:-5]) for t in tops)}
    dest = Path(tempfile.mkdtemp(prefix="detserve-nobody-"))
    atexit.register(shutil.rmtree, dest, True)
    for top in tops:
        (shutil.copytree if top.is_dir() else shutil.copy2)(top, dest / top.name)  # type: ignore[operator]
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644 | (path.stat().st_mode & 0o111))
    return str(dest)


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": _readable_packages(), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}


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
