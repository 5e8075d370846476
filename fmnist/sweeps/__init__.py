"""Sweeps past one process: job placement for parallel launchers, and Optuna search (tune.py)."""
