"""Evaluation: metrics, the evaluate/calibrate runner and the report formats of other frameworks."""
