"""Knowing before spending: memory estimates, step-time and scaling predictions, emulated device
speed and scaling sweeps."""
