"""One way to open an ONNX Runtime CPU session, shared by the served core and the in-process baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cpu_session(path: Path, intra_op_threads: int = 0, allow_spinning: bool = False) -> Any:
    """``intra_op_threads`` 0 lets onnxruntime decide. Spinning off: on a small CPU, threads that
    spin after each call steal time from the torch pre/post-processing running beside them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
