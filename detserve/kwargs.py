"""``--kw KEY=VALUE`` model keywords, parsed once for every command that builds a detector.

Foundation layer (imports only ``detserve.errors``): the CLI and the Flask baseline both read them,
and neither should import a family's model zoo module to get a string parser.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from detserve.errors import SpecError


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs from the command line, values read as JSON where they parse (``min_size=320`` is an int)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"model keyword {item!r} is not KEY=VALUE", hint="e.g. --kw min_size=320")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
