"""setup.py exists for one reason: the top-level ``kernels/`` folder is shipped as ``aigid.kernels``.

Everything else (metadata, dependencies, extras, entry points) lives in pyproject.toml.
"""
from setuptools import setup

setup(
    packages=["aigid", "aigid.models", "aigid.models.configs", "aigid.models.mirage",
              "aigid.models.unigendet", "aigid.data", "aigid.kernels"],
    package_dir={"aigid": "aigid", "aigid.kernels": "kernels"},
    package_data={"aigid.models.configs": ["*.json"]},
)
