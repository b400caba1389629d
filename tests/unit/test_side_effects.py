"""Install/run side effects of our dependencies that detserve switches off (brief: no network probes, no settings files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A session opened the way the served core and the in-process baseline open one, on a one-node model.
_SCRIPT = """
import sys
from pathlib import Path
from onnx import TensorProto, helper, save
import numpy as np
from detserve.runtime.onnxrt import cpu_session

graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
)
path = Path(sys.argv[1]) / "relu.onnx"
save(helper.make_model(graph), str(path))
print(cpu_session(path).run(None, {"x": np.ones(1, np.float32)})[0])
"""


def _files_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_onnxruntime_session_writes_nothing_under_home(tmp_path: Path) -> None:
    """onnxruntime's 1DS telemetry (device id + event database in ~/.cache/Microsoft/DeveloperTools,
    events for Microsoft's collector) stays off in any process that imports detserve."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")} | {"HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[1.]" in out.stdout
    assert _files_under(home) == []


@pytest.mark.parametrize("embedded", [True, False])
def test_server_environment_turns_onnxruntime_telemetry_off(embedded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from detserve.ops.embedded import server_environment

    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    assert server_environment(embedded)["ORT_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")  # an operator's own value wins
    assert server_environment(embedded)["ORT_DISABLE_TELEMETRY"] == "0"
