"""Offline jobs through the live server: bulk detection, mining, pre-labelling, image-file hygiene.

Client-side code: it talks to the server over gRPC (``clients``) and decodes with the server's own
rules (``detserve.runtime.imaging``); nothing here imports torch, so these jobs run from a client
install. The results file (``results.py``) is the contract between the jobs.
"""
