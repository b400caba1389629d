"""Triton python-backend models. Each generated ``model.py`` in a repository re-exports one of these.

They run inside Triton's python stub, where ``triton_python_backend_utils`` exists; the logic they
call lives in plain, unit-tested modules (imaging, preprocess, postprocess).
"""
