"""Calibration: observing a model's own attention, the default calibration data, recall metrics."""
