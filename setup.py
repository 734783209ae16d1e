"""Build script. The package is pure Python today; the C++/CUDA extension in
``csrc/`` will be added here (built only when torch is importable, so that
``pip install --no-build-isolation`` compiles it against the installed torch)."""

from setuptools import setup

setup()
