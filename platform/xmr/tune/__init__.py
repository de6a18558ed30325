"""Sweeps over the training job: search spaces (no Ray) and the Tune driver."""
