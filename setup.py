# Packaging metadata lives in pyproject.toml; this file lets `pip install -e .` work with older pips.
from setuptools import setup

setup()
