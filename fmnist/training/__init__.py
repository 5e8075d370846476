"""Training: the LightningModule, its callbacks, safe checkpoints, and `train(cfg, run_dir)`."""
