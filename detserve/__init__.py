"""detserve: serve PyTorch object detectors on Triton at high throughput."""

__version__ = "0.1.0"
