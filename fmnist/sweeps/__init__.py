"""Sweeps past one process: a sweep's checks before its first job (start.py), the launchers and job placement for
parallel ones (placement.py), and Optuna search (tune.py, with its storage and pruning)."""
