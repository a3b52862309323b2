"""Launching: on this machine (local.py, sdmoe-launch), on SLURM clusters (slurm.py, sdmoe-submit), and
torchrun that keeps the exit code and passes the stop signals on (torchrun.py)."""
