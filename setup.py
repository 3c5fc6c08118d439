# Packaging metadata lives in pyproject.toml. This file only ships csrc/ inside the wheel as fastbert/csrc, where
# fastbert/_ext.py finds and compiles it on first use (pip install itself never needs a compiler).
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    """Copy csrc/ into the built package as fastbert/csrc."""

    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        if src.is_dir():
            shutil.copytree(src, Path(self.build_lib) / "fastbert" / "csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithCsrc})
