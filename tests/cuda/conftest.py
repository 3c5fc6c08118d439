"""tests/cuda: the ctypes harness of the CUDA kernels (harness.py) goes on sys.path for the test modules here."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
