"""Calibration sets, activation capture inside the real sampling loops, and precision recipes."""
