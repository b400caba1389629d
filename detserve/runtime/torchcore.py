"""The torch core of the ``python-torch`` target: load a saved core artifact and run it on a device.

The build (converters/torch_export.py) saves each core step as a ``torch.export`` ExportedProgram
(``model.pt2``) or, where export cannot capture it, a TorchScript trace (``model.ts``). The python
step model (runtime/backend/step_model.py, ``TorchCore``) and the build's verification load it
here, so both run the same code. On ``device`` "cuda" the inputs are moved there (a GPU input
already is: DLPack, no copy) and the outputs stay there for the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError

EXPORTED, TRACED = ".pt2", ".ts"
DEVICES = ("cpu", "cuda")


def artifact_in(version_dir: Path, name: str) -> Path:
    """The core artifact of a version directory: ``name`` (the config's ``torch_file``, model.pt2), or
    the trace beside it where torch.export fell back for this detector. The config is shared by
    every version of the model, so it cannot name a file only one version's build chose."""
    path = version_dir / name
    if path.is_file():
        return path
    others = [p for p in (path.with_suffix(EXPORTED), path.with_suffix(TRACED)) if p.is_file()]
    if not others:
        raise SpecError(f"no torch core artifact {path} (nor {path.with_suffix(TRACED).name}) in {version_dir}")
    return others[0]


def load_core(path: Path, device: str = "cpu") -> Callable[..., Any]:
    """The saved core at ``path`` as a callable on ``device`` (eval, weights there)."""
    import torch

    if device not in DEVICES:
        raise SpecError(f"torch core device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("this torch core is configured for device 'cuda' but torch sees no CUDA GPU")
    if path.suffix == EXPORTED:
        program = torch.export.load(str(path))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            # weights AND the devices written into the graph (a factory call traced on the CPU, e.g.
            # torch.arange for anchors, names device "cpu"): Module.to would move the weights only
            program = move_to_device_pass(program, device)
        return program.module()  # type: ignore[no-any-return]
    if path.suffix == TRACED:
        return torch.jit.load(str(path), map_location=device)  # type: ignore[no-any-return]
    raise SpecError(f"{path}: not a torch core artifact (expected a {EXPORTED} or {TRACED} file)")


def run_core(module: Callable[..., Any], args: Sequence[Any], device: str = "cpu") -> list[Any]:
    """The core's outputs as a list of tensors (one output or several), without autograd; numpy
    arguments become tensors, every argument moves to ``device``."""
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
    tensors = [t.to(device) if t.device.type != device else t for t in tensors]
    with torch.inference_mode():
        out = module(*tensors)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def torch_dtype(dtype: Any) -> Any:
    """The torch dtype of a numpy dtype (Triton's declared output types)."""
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def pack_tensors(rows: Sequence[Any]) -> tuple[Any, np.ndarray]:
    """One request's per-image tensors (wherever they are) -> (their zero-padded stack, INT32 [n, ndim]
    own shapes): runtime.canvas.pack for torch tensors, so GPU outputs never visit the host."""
    import torch

    shapes = np.array([tuple(r.shape) for r in rows], dtype=np.int32).reshape(len(rows), -1)
    if all(tuple(r.shape) == tuple(rows[0].shape) for r in rows):
        return torch.stack(list(rows)), shapes
    out = rows[0].new_zeros((len(rows), *shapes.max(axis=0).tolist()))
    for i, r in enumerate(rows):
        out[(i, *(slice(0, s) for s in r.shape))] = r
    return out, shapes
