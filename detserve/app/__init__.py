"""The top layer: the ``detserve`` command and the reports and harnesses it runs (demo, ops report, compare, eval)."""
