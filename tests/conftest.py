import os
import subprocess
import sys
import tempfile

import numpy as np

# Tests import the top-level scripts (train.py, evaluate.py) and unit/ from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# UNIT_ATTN=auto keeps self-check verdicts and CPU timing choices in build/attention_cache.json:
# tests (and the train.py / evaluate.py processes they start) use a cache of their own instead,
# so they neither depend on nor change what a user's runs decided
os.environ["UNIT_ATTN_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="unit-attn-test-"), "attention_cache.json")
# Tests run the model on the readable reference attention (UNIT_ATTN=naive), in this process and in the scripts
# they start: with the default, auto, a model's first forward would build the C++ op and start the op's
# self-check child. The op's own tests (test_attention_op.py, test_attention_dispatch.py, test_cuda_emu.py)
# and the model tests that compare backends name theirs. UNIT_ATTN=fused pytest ... runs the rest on the op.
os.environ.setdefault("UNIT_ATTN", "naive")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_emu: csrc/attention.cu run on the CPU by the CUDA emulator "
                                       "(tests/cuda_emu); run alone with -m cuda_emu")


def rotation(axis, deg):
    """3x3 rotation by deg degrees about array axis 0, 1 or 2 (tests that move volumes: `from conftest import
    rotation`)."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def train_tiny(data, out, steps, *flags):
    """train.py on a small prepared dataset for `steps` steps (width 4, batch 2, CPU, naive attention, no
    evaluation), as a subprocess like a user's run; returns the path of its ckpt.pt."""
    r = subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(out), "--full", "--width", "4",
                        "--batch-size", "2", "--device", "cpu", "--eval-every", "0", "--max-steps", str(steps), *flags],
                       cwd=ROOT, env={**os.environ, "UNIT_ATTN": "naive"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return os.path.join(str(out), "ckpt.pt")
