"""Named by the model.py of repositories built before every step ran in one model: step_model serves them."""

from detserve.runtime.backend.step_model import TritonPythonModel  # noqa: F401
