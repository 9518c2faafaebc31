"""Build csrc/attention.cu (or any .cu given) against the CUDA emulator into a shared library.

    python tests/cuda_emu/build.py [FILE.cu] [--out DIR]     # prints the path of the library

The source is compiled unmodified except for one mechanical rewrite that C++ cannot express:
`kernel<<<grid, block, smem, stream>>>(args)` becomes
`emu::launch(kernel, "kernel", LINE, grid, block, smem, stream)(args)` (line numbers are kept, and
a #line directive makes compiler messages point at the original file). -DUNIT_CUDA_EMU drops the
inline-PTX wrappers of attention.cu; emu.h supplies emulated ones. The kernel file is compiled with
-fsanitize=thread for its instrumentation only: every load and store calls __tsan_readN /
__tsan_writeN, which emu.cpp implements (bounds, alignment, races, uninitialised reads); the
ThreadSanitizer runtime is not linked. Vectorisation is off so that each access the source makes
is checked as the source makes it.

Libraries are cached under build/cuda_emu/<hash of the sources and flags>/ (about 1 minute to
build on 2 cores).
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CXX = os.environ.get("CXX", "g++")
COMMON = ["-std=c++17", "-O2", "-g", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]
KERNEL_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-fno-tree-vectorize",
                "-fno-tree-slp-vectorize", "-DUNIT_CUDA_EMU"]

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<")


def rewrite_launches(src: str) -> str:
    """kernel<<<cfg>>>(args) -> emu::launch(kernel, "kernel", LINE, cfg)(args); newlines kept."""
    out, pos = [], 0
    while (m := LAUNCH.search(src, pos)) is not None:
        end = src.index(">>>", m.end())
        line = src.count("\n", 0, m.start()) + 1
        callee = m.group(1)
        out += [src[pos:m.start()], f'emu::launch({callee}, "{callee}", {line}, {src[m.end():end]})']
        pos = end + 3
    return "".join(out) + src[pos:]


def build(cu=ROOT / "csrc" / "attention.cu", out_root=ROOT / "build" / "cuda_emu", verbose=False) -> Path:
    cu = Path(cu).resolve()
    if shutil.which(CXX) is None:
        raise RuntimeError(f"{CXX} not found: the CUDA emulator needs a C++17 compiler with -fsanitize=thread")
    sources = [cu, HERE / "emu.h", HERE / "emu.cpp", HERE / "build.py"] + sorted(HERE.glob("*.h"))
    sources += [p for p in (cu.parent / "attention_cuda.h",) if p.exists()]
    key = hashlib.sha1()
    for p in sources:
        key.update(str(p.name).encode() + p.read_bytes())
    key.update(" ".join([CXX] + COMMON + KERNEL_FLAGS).encode())
    out = Path(out_root) / f"{cu.stem}_{key.hexdigest()[:12]}"
    lib = out / "libcuda_emu.so"
    if lib.exists():
        return lib
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / (cu.stem + ".emu.cpp")
    src.write_text(f'#line 1 "{cu}"\n' + rewrite_launches(cu.read_text()))
    includes = ["-I", str(HERE), "-I", str(cu.parent)]
    steps = [
        [CXX, *COMMON, *KERNEL_FLAGS, *includes, "-c", str(src), "-o", str(tmp / "kernels.o")],
        [CXX, *COMMON, "-I", str(HERE), "-c", str(HERE / "emu.cpp"), "-o", str(tmp / "emu.o")],
        [CXX, "-shared", "-o", str(tmp / lib.name), str(tmp / "kernels.o"), str(tmp / "emu.o"), "-Wl,-z,defs",
         "-lpthread"],
    ]
    for cmd in steps:
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation of {cu} failed:\n$ {' '.join(cmd)}\n"
                               f"{proc.stderr[-6000:]}")
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cu", nargs="?", default=str(ROOT / "csrc" / "attention.cu"))
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda_emu"))
    args = ap.parse_args()
    print(build(args.cu, args.out, verbose=True))
