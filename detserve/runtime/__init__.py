"""The serving runtime: image decoding, bit-exact preprocessing, the output contract, ONNX Runtime sessions, the Triton python-backend models."""
