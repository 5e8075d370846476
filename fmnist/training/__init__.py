"""Training: `train(cfg, run_dir)` (train.py), the checks before a run writes (claim.py; a config's values
without Lightning: checks.py), the LightningModule (module.py) and its optimizer Muon (muon.py), its callbacks,
safe checkpoints, a run directory's lock (rundir.py), signals, the choice of precision, the experiment trackers,
and the figures a run and the report draw (figures.py)."""
