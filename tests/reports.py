"""Figures tests measure go to out/reports/<file>.json (merged by key), for closing notes and docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORTS = Path(__file__).resolve().parents[1] / "out" / "reports"


def record(file: str, key: str, value: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))
