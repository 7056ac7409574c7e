"""The package version: one place, read by pyproject.toml (``tool.setuptools.dynamic``), the
results store's run records and ``aigid --version``, none of which may import ``aigid`` itself."""

__version__ = "0.1.0"
