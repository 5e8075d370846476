"""Training: `train(cfg, run_dir)` (train.py), the checks before a run writes (claim.py), the LightningModule,
its callbacks, safe checkpoints, signals, the choice of precision and the experiment trackers."""
