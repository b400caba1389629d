"""detserve: serve PyTorch object detectors on Triton at high throughput."""

import os as _os

__version__ = "0.1.0"

# onnxruntime's Linux wheels (1.32 here) carry Microsoft's 1DS telemetry: creating a session writes
# a device id and an event database under ~/.cache/Microsoft/DeveloperTools and queues events for
# https://mobile.events.data.microsoft.com. A serving stack must not probe the network or write
# settings files on its own, so every process that imports detserve (build, verify, bench, compare,
# eval) runs onnxruntime with telemetry off before it is imported; the server's stubs get the same
# from detserve.ops.embedded.server_environment. An operator's own value wins.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
