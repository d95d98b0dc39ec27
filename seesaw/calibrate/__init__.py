"""Calibration: measuring a machine and fitting a profile to real engine runs on it (runs the engine, unlike the simulator)."""
