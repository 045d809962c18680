"""Sweeps: ablation grids and searches run by Optuna workers, one MLflow child run per cell."""
