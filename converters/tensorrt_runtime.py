"""Run a TensorRT engine in-process on torch CUDA tensors (benchmarks, GPU checks, the end-to-end variant).

Inputs and outputs are torch tensors on the GPU, so the torch post-processing reads the engine's
outputs where they are, with no copy; the engine runs on torch's current CUDA stream, so torch
work queued after a call is ordered after it. The engine's metadata is checked against this
machine before TensorRT deserialises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters.tensorrt_env import PlanMetadata, check_plan_compatible, import_tensorrt
from converters.tensorrt_profile import INPUT_NAME


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dtype]


class TrtEngine:
    """One engine and one execution context; ``engine(images)`` -> {output name: tensor}."""

    def __init__(self, plan_path: Path, same_gpu_model: bool = True) -> None:
        self.metadata: PlanMetadata = check_plan_compatible(plan_path, same_gpu_model)
        self._trt = trt = import_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            from converters.tensorrt_env import EngineMismatchError

            raise EngineMismatchError(f"TensorRT could not deserialise {plan_path}", hint="rebuild the engine on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, images: Any) -> dict[str, Any]:
        import torch

        images = images.to(device="cuda", dtype=torch.float32).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(images.shape))
        self.context.set_tensor_address(INPUT_NAME, int(images.data_ptr()))
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=images.device)
            self.context.set_tensor_address(name, int(outputs[name].data_ptr()))
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs
