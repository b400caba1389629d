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
# An HTTP body that stops arriving (shorter than its Content-Length, or a stalled upload) is refused with
# 408 after this many seconds without a byte, not after idle_timeout_s (60 s): an HTTP client sends its
# body in one go, while a gRPC stream may pause between messages and keeps idle_timeout_s (issue 24).
HTTP_BODY_TIMEOUT_S = 10
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


# Errors that name the mistake (issue 24, part 3). Triton 2.51 answers a BYTES element whose 4-byte
# little-endian length prefix is missing with "incomplete string data ... expecting string of length
# 1196314761": the first 4 bytes of the image read as a length. Triton rejects it before any detserve
# code runs, so the gate adds the explanation to Triton's message, and names the file format when the
# "length" is the start of a known image signature. BMP ("BM" + two bytes of the file size) has no fixed
# value and gets the general explanation only.
BYTES_PREFIX_HINT = (
    "BYTES elements are length-prefixed: each is a 4-byte little-endian byte count, then the bytes (docs/contract.md)"
)
_JPEG_MARKERS = [*range(0xE0, 0xF0), 0xDB, 0xFE, 0xC0, 0xC2, 0xC4]
SIGNATURE_LENGTHS: tuple[tuple[str, int], ...] = (
    ("PNG", int.from_bytes(b"\x89PNG", "little")),
    ("GIF", int.from_bytes(b"GIF8", "little")),
    ("WebP", int.from_bytes(b"RIFF", "little")),
    ("TIFF", int.from_bytes(b"II*\x00", "little")),
    ("TIFF", int.from_bytes(b"MM\x00*", "little")),
    *(("JPEG", int.from_bytes(bytes([0xFF, 0xD8, 0xFF, m]), "little")) for m in _JPEG_MARKERS),
)
# JSON "data" of a BYTES input is taken as the bytes of the string, never base64-decoded: an image sent that
# way reaches the decoder as base64 text, whose first characters name the format it encodes.
BASE64_STARTS = (("PNG", "iVBOR"), ("JPEG", "/9j/"), ("GIF", "R0lGOD"), ("WebP", "UklGR"))
BASE64_HINT = "JSON data of a BYTES input is not base64-decoded: send the file in the binary-data extension"
JSON_PARSE_HINT = (
    "with Inference-Header-Content-Length the JSON part is that many bytes at the start of the body: "
    "the header must be the exact byte length of the JSON"
)


def signature_hint(fmt: str) -> str:
    return f"these 4 bytes are the start of a {fmt} file, not a length: was the length prefix left out?"


def error_maps() -> str:
    """http-level maps: JSON error bodies labelled ``application/json``; ModelInfer's grpc-message with the hints.

    Triton 2.51 labels the errors of an ensemble's steps ``text/plain`` although every HTTP error body it
    writes is ``{"error": ...}``."""
    formats = "".join(f'        "~expecting string of length {v} " " {signature_hint(f)}";\n' for f, v in SIGNATURE_LENGTHS)
    var = "$upstream_http_grpc_message"
    return f"""    map $upstream_http_content_type $detserve_content_type {{
        default $upstream_http_content_type;
        "~^text/plain" application/json;
    }}
    map {var} $detserve_grpc_format {{
        default "";
{formats}    }}
    map {var} $detserve_grpc_message {{
        default {var};
        "~incomplete string (data|length indicator)" "{var} ({BYTES_PREFIX_HINT};$detserve_grpc_format)";
    }}
"""


def http_error_rewrites() -> str:
    """server-level directives of the HTTP gate: every Triton answer relabelled through ``error_maps`` and
    the hints added to Triton's messages (``sub_filter``). The content type of an upstream answer is known
    only once it arrives, so sub_filter looks at every type ('*'; our strings occur in error bodies only)."""
    subs = [("incomplete string data", f"{BYTES_PREFIX_HINT}: incomplete string data")]
    subs += [("incomplete string length indicator", f"{BYTES_PREFIX_HINT}: incomplete string length indicator")]
    subs += [
        (f"expecting string of length {v} ", f"expecting string of length {v} ({signature_hint(f)}) ")
        for f, v in SIGNATURE_LENGTHS
    ]
    subs += [(f"starting b'{b}", f"base64 text of a {f} file? {BASE64_HINT}; starting b'{b}") for f, b in BASE64_STARTS]
    subs += [("failed to parse the request JSON buffer", f"failed to parse the request JSON buffer ({JSON_PARSE_HINT})")]
    return (
        "        proxy_hide_header Content-Type;\n"
        "        add_header Content-Type $detserve_content_type always;\n"
        "        sub_filter_types *;\n"
        "        sub_filter_once on;\n" + "".join(f'        sub_filter "{a}" "{b}";\n' for a, b in subs)
    )


def grpc_infer_location(upstream: str) -> str:
    """An exact location for the unary ModelInfer whose grpc-message gets the hints of ``error_maps``.

    Its errors are trailers-only responses (grpc-message among the headers), which ``add_header`` can
    replace. Only there: ``grpc_hide_header`` also drops a grpc-message sent in trailers after a response
    began (streams), and ``add_trailer`` turns a trailers-only answer into one gRPC clients reject."""
    return (
        "        location = /inference.GRPCInferenceService/ModelInfer {\n"
        "            grpc_hide_header grpc-message;\n"
        "            add_header grpc-message $detserve_grpc_message always;\n"
        f"            grpc_pass {upstream};\n"
        "        }\n"
    )
