"""Ray Train: the training job (driver), its per-worker loop, distributed evaluation and
run directories. ``xmr.train.driver.run_training`` is the one entry point."""
