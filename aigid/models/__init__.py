"""Detector models: thin classes over ``aigid.ops``."""
