"""The servers a Python team would pick instead of Triton, serving detserve's own in-process pipeline.

``common`` (settings, the pipeline, the answer), one launcher module per peer (``ray_peer``,
``lit_peer``, ``bento_peer``), ``service`` (a peer as a subprocess), ``measure`` (the sweep and the
measured run of ``detserve bench --peers``), ``report`` (its part of bench.md). Needs the ``peers``
extra (ray[serve], litserve, bentoml).
"""
