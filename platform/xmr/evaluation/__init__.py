"""Embed a split with a model and score it; the same code runs offline, in Train workers
(after gathering) and behind the endpoint's tests."""

# The metric each task family selects checkpoints and sweeps by (higher is better).
MAIN_METRIC = {"category": "map_mean", "pair": "r1_mean", "vcmr": "vcmr_0.7_r10"}
