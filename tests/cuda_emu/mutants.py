"""Plant bugs in scratch copies of csrc/attention.cu and check that the emulated tests catch each.

    python tests/cuda_emu/mutants.py            # all mutants (~8 min on 2 cores)
    python tests/cuda_emu/mutants.py --list     # what they are
    python tests/cuda_emu/mutants.py -k wait    # those whose name contains "wait"

Five kinds of bug a GPU punishes and a careless CPU port would not (issue 7): a __syncthreads
removed (each of them in turn), a cp.async wait one group too weak (each), the key mask off by one
(forward and backward), a wrong ldmatrix row address (each of the four call sites), the dK (and
dQ) atomics turned into plain read-modify-writes. Each mutant is built against the emulator and
`pytest -m cuda_emu -x` runs on it (UNIT_EMU_CU); a mutant is caught when a test fails. The tests
are the ordinary emulated suite, not written for these mutants. Prints a markdown table.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CU = ROOT / "csrc" / "attention.cu"


def substitute(src, pattern, repl, n):
    """src with the n-th (0-based) match of pattern replaced by repl (a template or a function of
    the match), and the line of that match."""
    ms = list(re.finditer(pattern, src))
    if n >= len(ms):
        raise ValueError(f"pattern {pattern!r} has {len(ms)} matches in attention.cu, not {n + 1}")
    m = ms[n]
    new = repl(m) if callable(repl) else m.expand(repl)
    return src[:m.start()] + new + src[m.end():], src.count("\n", 0, m.start()) + 1


def mutants(src):
    """-> [(name, description, mutated source)]"""
    out = []

    def add(name, pattern, repl, n, what):
        new, line = substitute(src, pattern, repl, n)
        out.append((name, f"{what} (attention.cu:{line})", new))

    for n in range(len(re.findall(r"__syncthreads\(\);", src))):
        add(f"no-syncthreads-{n}", r"__syncthreads\(\);", ";", n, "a __syncthreads() removed")
    for n in range(len(re.findall(r"cp_async_wait<(\d)>\(\)", src))):
        add(f"weak-wait-{n}", r"cp_async_wait<(\d)>\(\)", lambda m: f"cp_async_wait<{int(m.group(1)) + 1}>()", n,
            "a cp.async wait one group too weak")
    # the key masks: forward (scores of keys j >= N set to -inf) and backward (P = 0 for j >= N)
    add("key-mask-fwd", r"if \(j0 \+ 8 \* n \+ 2 \* q4 \+ e >= N\)", r"if (j0 + 8 * n + 2 * q4 + e > N)", 0,
        "forward key mask off by one (j > N)")
    add("key-mask-bwd", r"const bool valid = j0 \+ 8 \* n \+ 2 \* q4 \+ \(e & 1\) < N;",
        r"const bool valid = j0 + 8 * n + 2 * q4 + (e & 1) < N - 1;", 0,
        "backward key mask off by one (j < N - 1: the last key dropped)")
    add("key-mask-bwd-extra", r"const bool valid = j0 \+ 8 \* n \+ 2 \* q4 \+ \(e & 1\) < N;",
        r"const bool valid = j0 + 8 * n + 2 * q4 + (e & 1) <= N;", 0,
        "backward key mask off by one (j <= N: one key too many)")
    # ldmatrix row addresses in warp_mma: the row offset of matrix mi uses the wrong bit of mi
    for n, (pat, repl) in enumerate([
            (r"ldsm_x4\(a, sA \+ \(r8 \+ 8 \* \(mi & 1\)\)", r"ldsm_x4(a, sA + (r8 + 8 * (mi >> 1))"),
            (r"ldsm_x4_t\(a, sA \+ \(k0 \+ r8 \+ 8 \* \(mi >> 1\)\)", r"ldsm_x4_t(a, sA + (k0 + r8 + 8 * (mi & 1))"),
            (r"ldsm_x4\(b, sB \+ \(8 \* n \+ r8 \+ 8 \* \(mi >> 1\)\)", r"ldsm_x4(b, sB + (8 * n + r8 + 8 * (mi & 1))"),
            (r"ldsm_x4_t\(b, sB \+ \(k0 \+ r8 \+ 8 \* \(mi & 1\)\)", r"ldsm_x4_t(b, sB + (k0 + r8 + 8 * (mi >> 1))")]):
        add(f"ldmatrix-row-{n}", pat, repl, 0, "a wrong ldmatrix row address")
    add("dk-plain-rmw", r"atomicAdd\(dk_acc \+ ([^,]+), ([^;]+)\);", r"dk_acc[\1] += \2;", 0,
        "dK atomicAdd made a plain read-modify-write")
    add("dq-plain-rmw", r"atomicAdd\(dq_acc \+ ([^,]+), ([^;]+)\);", r"dq_acc[\1] += \2;", 0,
        "dQ atomicAdd made a plain read-modify-write")
    return out


# Mutants that cannot change any output, with the reason; their survival is not a miss.
EQUIVALENT = {
    "key-mask-bwd-extra": "equivalent: the extra key j = N has zero-filled K and V tiles, so its dS adds "
                          "dS * 0 to dQ, and its dK column is never stored (`if (j < N)`)",
}


def run(name, source, workdir):
    d = Path(workdir) / name
    d.mkdir()
    (d / "attention.cu").write_text(source)
    (d / "attention_cuda.h").write_text((CU.parent / "attention_cuda.h").read_text())
    env = {**os.environ, "UNIT_EMU_CU": str(d / "attention.cu")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda_emu", "-x", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_cuda_emu.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    secs = time.time() - t0
    failed = re.search(r"^FAILED (\S+)", proc.stdout, re.M) or re.search(r"^ERROR (\S+)", proc.stdout, re.M)
    why = re.search(r"^E +(.*)$", proc.stdout, re.M)
    return proc.returncode != 0, (failed.group(1).split("::")[-1] if failed else ""), \
        (why.group(1)[:150] if why else ""), secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    src = CU.read_text()
    ms = [m for m in mutants(src) if args.k in m[0]]
    if args.list:
        for name, what, _ in ms:
            print(f"{name:20s} {what}")
        return
    print("| mutant | bug | caught | first failing test | emulator / assertion message |")
    print("|---|---|---|---|---|")
    missed = equivalent = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, what, new in ms:
            caught, test, why, secs = run(name, new, tmp)
            verdict = "yes" if caught else "no (equivalent)" if name in EQUIVALENT else "**NO**"
            missed += not caught and name not in EQUIVALENT
            equivalent += name in EQUIVALENT
            why = (why if caught else EQUIVALENT.get(name, "")).replace("|", "/")
            print(f"| {name} | {what} | {verdict} ({secs:.0f} s) | {test} | {why} |", flush=True)
    print(f"\n{len(ms) - equivalent - missed} of {len(ms) - equivalent} non-equivalent mutants caught"
          + (f"; {equivalent} equivalent (cannot change any output)" if equivalent else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
