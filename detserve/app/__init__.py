"""The top layer: the ``detserve`` command and the demo; the workflows they run live below (verification,
converters, loadtest)."""
