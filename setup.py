"""setup.py exists for one reason: to ship the top-level ``kernels/`` folder as ``aigid.kernels``.

``aigid/kernels`` is a symbolic link to ``kernels/``, and neither holds an ``__init__.py``, so
``aigid.kernels`` is a namespace package inside ``aigid`` and the top-level folder never shadows
an installed distribution named ``kernels`` (see kernels/README.md). ``find_packages`` sees only
folders with an ``__init__.py``, so the link is named here. Everything else (metadata,
dependencies, extras, entry points) lives in pyproject.toml.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["aigid", "aigid.*"]) + ["aigid.kernels"],
    package_data={"aigid.models.configs": ["*.json"]},
)
