"""The core ONNX parsed into a TensorRT network, and the parser's errors as one clear detserve error.

The mapping from parser errors (which node, which op, what TensorRT said) to
:class:`UnsupportedOpError` / :class:`OnnxParseError` is plain data handling, tested on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError


class UnsupportedOpError(DetserveError):
    """The ONNX parser has no importer for an op of the core graph."""


class OnnxParseError(DetserveError):
    """The ONNX parser refused the core graph for another reason than an unsupported op."""


@dataclass(frozen=True)
class ParserIssue:
    code: str  # ErrorCode member name, e.g. "UNSUPPORTED_NODE"
    description: str
    node_index: int = -1
    node_name: str = ""
    op: str = ""


def _call(obj: Any, method: str, default: Any) -> Any:
    """Optional ParserError accessors (node_name/node_operator arrived in TensorRT 8.6/10)."""
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else default
    except Exception:
        return default


def parser_issues(parser: Any) -> list[ParserIssue]:
    """The parser's errors as plain data."""
    issues = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        code = str(_call(err, "code", "UNKNOWN")).rsplit(".", 1)[-1]
        issues.append(
            ParserIssue(
                code=code,
                description=str(_call(err, "desc", str(err))),
                node_index=int(_call(err, "node", -1)),
                node_name=str(_call(err, "node_name", "")),
                op=str(_call(err, "node_operator", "")),
            )
        )
    return issues


def onnx_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of every top-level node, to name a node the parser only gives by index."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node]


def _with_node(issue: ParserIssue, nodes: Sequence[tuple[str, str]]) -> ParserIssue:
    if (issue.node_name and issue.op) or not 0 <= issue.node_index < len(nodes):
        return issue
    name, op = nodes[issue.node_index]
    return dataclasses.replace(issue, node_name=issue.node_name or name, op=issue.op or op)


def _is_unsupported(issue: ParserIssue) -> bool:
    return issue.code.startswith("UNSUPPORTED_NODE") or "No importer registered" in issue.description


def parse_error(
    issues: Sequence[ParserIssue], nodes: Sequence[tuple[str, str]] = (), tensorrt_version: str = ""
) -> DetserveError:
    """The parser's errors as one clear error: which node, which op, what TensorRT said."""
    issues = [_with_node(i, nodes) for i in issues]
    unsupported = [i for i in issues if _is_unsupported(i)]
    shown = unsupported or issues
    parts = [f"node {i.node_name or '#' + str(i.node_index)!r} (op {i.op or '?'}): {i.description}" for i in shown[:5]]
    more = f"; and {len(shown) - 5} more" if len(shown) > 5 else ""
    trt = f"TensorRT {tensorrt_version}" if tensorrt_version else "TensorRT"
    if unsupported:
        ops = sorted({i.op or "?" for i in unsupported})
        return UnsupportedOpError(
            f"{trt} cannot import op {', '.join(ops)}: " + "; ".join(parts) + more,
            hint="serve this detector with --target onnxruntime, or change the export so the op is not needed",
        )
    if not issues:
        return OnnxParseError(f"{trt}'s ONNX parser failed without reporting an error", hint="rerun with a verbose logger")
    return OnnxParseError(f"{trt}'s ONNX parser refused the core: " + "; ".join(parts) + more)


def parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """The network of the core ONNX; parser errors become UnsupportedOpError / OnnxParseError."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parse_error(parser_issues(parser), onnx_nodes(onnx_path), str(trt.__version__))
    return network, parser
