"""``edge-msd sweep``: the accuracy-latency chooser over student presets (``run``), its points and Pareto
front (``points``) and its config (``config``)."""
