import os
import sys

# Tests import the top-level scripts (train.py, evaluate.py) and unit/ from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_emu: csrc/attention.cu run on the CPU by the CUDA emulator "
                                       "(tests/cuda_emu); run alone with -m cuda_emu")
