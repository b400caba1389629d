"""nginx ``map`` rules of the gate (``gate.py``): the JSON-size cap, the exact admin-key match, the HTTP deadline.

nginx ``map`` compares plain strings case-insensitively and reads a value that starts with ``~`` as a
regular expression (issue 20, findings 7b/7c). Every rule here is therefore an anchored,
case-sensitive regular expression built from escaped text, or a fixed token map whose inputs are
other maps' tokens: no client-controlled text is ever compared case-insensitively or read as a regex.

The JSON cap (issue 20, finding 1): Triton 2.51's HTTP JSON parser recurses without a depth limit and
a few tens of KB of nesting crash tritonserver (measured in docs/deployment.md). nginx cannot look
into the body, so the gate bounds the JSON *part* by its length: the whole body when there is no
``Inference-Header-Content-Length`` header (the binary-data extension), else that header's value.
nginx has no arithmetic either: "at most N" and "header larger than the body" are regexes over the
decimal digits, generated here.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re

GATE_USER = "detserve-gate"  # created by scripts/setup.sh when run as root
JSON_HEADER = "inference-header-content-length"
TIMEOUT_HEADER = "detserve-timeout"  # an HTTP client's own deadline, grpc-timeout format ("10S", "1500m")
_TIMEOUT_UNITS = "HMSmun"  # as grpc-timeout: hours, minutes, seconds, milli-, micro-, nanoseconds

log = logging.getLogger(__name__)


def at_most(n: int) -> str:
    """A regex (no anchors) for decimal numbers without leading zeros whose value is at most ``n``."""
    digits = str(n)
    alternatives = ["0", "[1-9]"] + [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(digits))]
    for i, d in enumerate(digits):
        if int(d) > (1 if i == 0 else 0):  # a smaller digit here, any digits after
            low = "1" if i == 0 else "0"
            rest = len(digits) - i - 1
            alternatives.append(digits[:i] + f"[{low}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    if len(digits) == 1:
        alternatives = ["0"] + ([f"[1-{n}]"] if n >= 1 else [])
    return "(" + "|".join(dict.fromkeys(alternatives)) + ")"


def greater_patterns(max_digits: int) -> list[str]:
    """Anchored regexes over ``"A:B"`` (A, B decimal, no leading zeros, A at most ``max_digits`` long)
    that match exactly when A > B: A longer than B, or as long and larger at the first differing digit
    (``(\\d*)`` is the common prefix, found by backtracking, ``\\1`` repeats it on B's side)."""
    patterns = [f"^[1-9][0-9]{{{k - 1}}}:[0-9]{{1,{k - 1}}}$" for k in range(2, max_digits + 1)]
    digit_steps = "|".join(f"{d}[0-9]*:\\1[0-{d - 1}]" for d in range(9, 0, -1))
    for k in range(1, max_digits + 1):
        patterns.append(f"^(?=[0-9]{{{k}}}:[0-9]{{{k}}}$)([0-9]*)(?:{digit_steps})[0-9]*$")
    return patterns


def json_cap_maps(max_json_bytes: int) -> str:
    """Maps that end in ``$detserve_json``: ``ok``, ``bad_header``, ``too_large``, ``unbounded`` or ``header_over_body``."""
    le = at_most(max_json_bytes)
    over = "".join(f'        "~{p}" over;\n' for p in greater_patterns(len(str(max_json_bytes))))
    return f"""    map $http_{JSON_HEADER.replace("-", "_")} $detserve_json_header {{
        "" none;
        "~^{le}$" ok;
        "~^[1-9][0-9]*$" big;
        default bad;
    }}
    map $content_length $detserve_json_body {{
        "" none;
        "~^{le}$" small;
        default big;
    }}
    map $http_transfer_encoding $detserve_json_chunked {{
        "" no;
        default yes;
    }}
    map "$http_{JSON_HEADER.replace("-", "_")}:$content_length" $detserve_json_over {{
        default no;
{over}    }}
    map "$detserve_json_header:$detserve_json_body:$detserve_json_chunked:$detserve_json_over" $detserve_json {{
        default ok;
        "~^none:none:yes:" unbounded;
        "~^none:big:" too_large;
        "~^big:" too_large;
        "~^bad:" bad_header;
        "~^ok:[a-z]+:[a-z]+:over$" header_over_body;
    }}
"""


def key_maps(key: str | None, headers: dict[str, str]) -> str:
    """``$var`` = 1 exactly when the header equals ``key`` (case-sensitive, every regex character escaped)."""
    lines = []
    for var, header in headers.items():
        entry = f'        "~^{re.escape(key)}$" 1;\n' if key else ""
        lines.append(f"    map $http_{header.replace('-', '_')} ${var} {{\n        default 0;\n{entry}    }}\n")
    return "".join(lines)


def timeout_map(default_s: int) -> str:
    """``$detserve_http_timeout``: the client's ``detserve-timeout`` when it is a grpc-timeout value, else the default."""
    header = TIMEOUT_HEADER.replace("-", "_")
    return (
        f"    map $http_{header} $detserve_http_timeout {{\n"
        f"        default {default_s}S;\n"
        f'        "~^[0-9]{{1,8}}[{_TIMEOUT_UNITS}]$" $http_{header};\n'
        "    }\n"
    )


def gate_user() -> tuple[str, str] | None:
    """The unprivileged (user, group) nginx's workers run as when detserve runs as root; None otherwise.

    None as root means the dedicated user does not exist (scripts/setup.sh creates it): the workers then
    keep root, as before, and a warning says so."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(GATE_USER)
    except KeyError:
        log.warning("user %s does not exist: the gate's nginx workers run as root (run scripts/setup.sh as root)", GATE_USER)
        return None
    return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name
