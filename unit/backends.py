"""Which implementation of the attention op runs: UNIT_ATTN, the self-check, its cache, the fallback.

    attention(q, k, v) = v . softmax_keys(q^T k), no 1/sqrt(d) scale   (attention_reference() defines it)
    q, k: (B, d, N)   v: (B, c, N)   ->   o: (B, c, N)

Backends, chosen with UNIT_ATTN=auto (default) | naive | sdpa | fused:
  naive  attention_reference(): bmm + softmax + bmm. The readable definition that every
         other path is tested against; holds the (B, N, N) matrix.
  sdpa   attention_sdpa(): torch's scaled_dot_product_attention(scale=1.0) on the transposed
         tensors. On CUDA its memory-efficient kernel needs O(N) memory and accepts d_v != d_qk; on
         the CPU torch has only its math path for d_v != d_qk, which holds (B, N, N) like naive.
  fused  csrc/ through unit/ops.py: CUDA kernels and a C++ CPU kernel, O(N) memory.
auto:
  CUDA  fused if it built for this GPU, passed its self-check here, and the kernels can run the
        shape (unit.ops.cuda_unsupported: d <= 128, c <= 1024, shared memory...); else sdpa.
  CPU   fused if it passed its self-check, unless naive or sdpa (torch's math path on the CPU) is
        at least 10% faster for this shape (timed once per shape and dtype, interleaved; those two
        only where their B N^2 matrices are small).
A named backend (UNIT_ATTN=fused, ...) is used as it is: no self-check, errors are raised. The choice
is made at the first call for a shape, not at import: a model run with UNIT_ATTN=naive (as the tests
that are not about the op do, tests/conftest.py) never builds the op nor starts a self-check.

The self-check runs the first time the fused op would be used on a device type (a GPU model, a CPU
model), in a child process, so that a crash in a kernel (an illegal address kills the CUDA context)
cannot take training down: forward and gradients against the float64 reference over the model's
kinds of shapes (cp.async and element paths, d = 32, 64, 128) in float32 and bfloat16. Its verdict
and the CPU timing choices are kept in build/attention_cache.json (or $UNIT_ATTN_CACHE), keyed by
the device, torch, CUDA and a hash of csrc/, so later runs pay nothing. Every fallback, and each
CPU choice, prints one line saying why.
"""
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("auto", "naive", "sdpa", "fused")


def attention_reference(q, k, v):
    """Plain PyTorch: holds the full (B, N, N) attention matrix. The definition, not the fast path."""
    s = torch.bmm(q.transpose(1, 2), k)            # (B, N, N): s[b, i, j] = q_i . k_j
    # softmax over keys j, for each query i; its statistics in at least fp32 (bf16 under autocast)
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype)
    return torch.bmm(v, p.transpose(1, 2))         # (B, c, N): o_i = sum_j p_ij v_j


def attention_sdpa(q, k, v):
    """torch's scaled_dot_product_attention with scale 1 on (B, 1, N, features), the layout it
    wants (feature dim contiguous: otherwise CUDA falls back to its N x N math path)."""
    qh, kh, vh = (x.transpose(1, 2).contiguous().unsqueeze(1) for x in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh, scale=1.0).squeeze(1).transpose(1, 2)


def backend():
    """The UNIT_ATTN setting: auto, naive, sdpa or fused (checked)."""
    want = os.environ.get("UNIT_ATTN", "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"UNIT_ATTN={want!r} is not one of {', '.join(BACKENDS)}"
                         + (" ('torch' is now called 'naive')" if want == "torch" else ""))
    return want


def used():
    """The backends attention() has picked so far in this process, e.g. ['fused']."""
    return sorted(set(_choices.values()))


def describe():
    """One line for logs: what attention() will run on."""
    want = backend()
    if want != "auto":
        return f"UNIT_ATTN={want}"
    return ("UNIT_ATTN=auto: on CUDA the fused op where it is verified and supported, else SDPA; "
            "on the CPU the fastest of fused, naive and sdpa per shape")


def attention(q, k, v):
    """o = v . softmax_keys(q^T k). q, k: (B, d, N), v: (B, c, N) -> (B, c, N)."""
    return _IMPLS[_choose(q, k, v)](q, k, v)


def _fused(q, k, v):
    from unit import ops
    return ops.fused_attention(q, k, v)


_IMPLS = {"naive": attention_reference, "sdpa": attention_sdpa, "fused": _fused}


# ---------------------------------------------------------------------------------------------
# auto


_choices = {}   # (UNIT_ATTN, device, dtype, shape, c, grad enabled) -> backend, for this process
_verdicts = {}  # device ("cuda:0", "cpu") -> did the fused op pass its self-check there


def _choose(q, k, v):
    want = backend()
    key = (want, str(q.device), q.dtype, tuple(q.shape), v.shape[1], torch.is_grad_enabled())
    if key not in _choices:
        _choices[key] = want if want != "auto" else _choose_auto(q, k, v)
    return _choices[key]


def _fallback(kind):
    """The backend auto uses where the fused op is not: SDPA is O(N) on CUDA, only math on the CPU."""
    return "sdpa" if kind == "cuda" else "naive"


def _choose_auto(q, k, v, kind=None):
    from unit import ops
    kind = kind or q.device.type
    fallback = _fallback(kind)
    if kind not in ("cuda", "cpu"):
        return fallback
    if not ops.load(verbose=True):  # warned once already
        return fallback
    if not ops.supports(kind):
        _note(f"the fused op has no {kind} kernels in this build (see the warning above); using {fallback}")
        return fallback
    if not _verified(q.device):
        return fallback
    if kind == "cuda":
        why = ops.cuda_unsupported(q, k, v)
        if why:
            _note(f"the fused CUDA kernels cannot run (B, d, c, N) = {_shape(q, v)} in {q.dtype}: {why}; using sdpa")
            return "sdpa"
        return "fused"
    return _cpu_choice(q, k, v)


def _shape(q, v):
    return (q.shape[0], q.shape[1], v.shape[1], q.shape[2])


def _note(msg):
    print(f"attention: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the cache file (self-check verdicts, CPU choices)


def cache_path():
    return Path(os.environ.get("UNIT_ATTN_CACHE") or ROOT / "build" / "attention_cache.json")


def _cache_get(section, key):
    try:
        return json.loads(cache_path().read_text()).get(section, {}).get(key)
    except (OSError, ValueError):
        return None


def _cache_put(section, key, value):
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data.setdefault(section, {})[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as e:
        _note(f"could not write {path} ({e}); what it would have kept is measured again next time")


def _device_key(device):
    """What a verdict depends on: the device model, torch, CUDA and the kernels' source."""
    from unit import ops
    h = hashlib.sha1()
    for p in sorted((ROOT / "csrc").glob("*")):
        h.update(p.name.encode() + p.read_bytes())
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        dev = f"{torch.cuda.get_device_name(device)} sm_{cc[0]}{cc[1]} cuda {torch.version.cuda}"
    else:
        dev = f"cpu {platform.machine()} {ops._machine_tag()}"
    return f"{dev} | torch {torch.__version__} | csrc {h.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# the self-check: a child process, its verdict cached


def _verified(device):
    kind = device.type
    if str(device) not in _verdicts:
        key = _device_key(device)
        verdict = _cache_get("selfcheck", key)
        if verdict is None:
            _note(f"checking the fused op on {kind} once, in a child process ({key})...")
            verdict = run_selfcheck(str(device))
            verdict["date"] = datetime.date.today().isoformat()
            _cache_put("selfcheck", key, verdict)
        if not verdict["ok"]:
            warnings.warn(f"unit/backends.py: the fused attention op failed its self-check on {key}: "
                          f"{verdict['detail']} -- using {_fallback(kind)}. Please report this message (and your GPU/CPU, "
                          f"torch and CUDA versions) as an issue; delete {cache_path()} to check again.",
                          RuntimeWarning, stacklevel=3)
        _verdicts[str(device)] = verdict["ok"]
    return _verdicts[str(device)]


FUSED_OP = "unit.ops:fused_attention"  # module:function the self-check examines by default


def run_selfcheck(device, op=FUSED_OP, timeout=600):
    """Run selfcheck() in a child process -> {"ok": bool, "detail": str}. A crash, a hang or a
    garbled answer of the child is a failed verdict with what it printed last."""
    cmd = [sys.executable, "-m", "unit.backends", "--selfcheck", device, "--op", op]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"the self-check process did not finish in {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            verdict = json.loads(lines[-1])
            return {"ok": bool(verdict["ok"]), "detail": str(verdict["detail"])}
        except (ValueError, KeyError, TypeError):
            pass
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {"ok": False, "detail": f"the self-check process died ({how}): {last}"}


# (B, d, c, N): the encoder's and generator's kinds of shape (d = 64 / 32, c = 8d), N a multiple of
# 8 (the CUDA kernels' cp.async path) and odd (element loads), and d = 128 (width 128)
SELFCHECK_SHAPES = [(2, 64, 512, 1216), (2, 32, 256, 2048), (1, 64, 512, 333), (1, 32, 256, 517),
                    (1, 128, 1024, 200)]
SELFCHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def selfcheck(device, fused):
    """The fused op against float64 attention_reference, forward and gradients, in float32 and
    bfloat16, over SELFCHECK_SHAPES (those the CUDA kernels support on this GPU). -> (ok, detail)"""
    from unit import ops
    device = torch.device(device)
    worst, n = 0.0, 0
    for dtype, tol in SELFCHECK_TOL.items():
        for B, d, c, N in SELFCHECK_SHAPES:
            g = torch.Generator().manual_seed(n)
            q, k = ((torch.randn(B, d, N, generator=g) * d ** -0.25).to(device) for _ in range(2))
            v, w = (torch.randn(B, c, N, generator=g).to(device) for _ in range(2))
            if device.type == "cuda" and ops.cuda_unsupported(q.to(dtype), k.to(dtype), v.to(dtype)):
                continue  # auto sends this shape to sdpa anyway
            ins = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            ref = [x.detach().double().requires_grad_() for x in ins]
            o, o_ref = fused(*ins), attention_reference(*ref)
            (o.float() * w).sum().backward()
            (o_ref * w.double()).sum().backward()
            for name, a, b in [("o", o, o_ref)] + [(f"d{x}", i.grad, r.grad) for x, i, r in zip("qkv", ins, ref)]:
                err = ((a.detach().double() - b.detach()).abs().max() / b.abs().max()).item()
                if not err < tol:  # NaN fails too
                    return False, (f"{name} of (B, d, c, N) = {(B, d, c, N)} in {dtype}: relative error {err:.1e} "
                                   f"(tolerance {tol:.0e})")
                worst = max(worst, err)
            n += 1
    if n == 0:
        return False, "no shape of the self-check is supported by the kernels on this device"
    return True, f"{n} cases (fp32, bf16; forward and gradients), largest relative error {worst:.1e}"


def _selfcheck_main(argv):
    import argparse
    import importlib
    ap = argparse.ArgumentParser(description="Self-check of the fused attention op (run by unit/backends.py "
                                             "in a child process); prints one JSON verdict line.")
    ap.add_argument("--selfcheck", required=True, metavar="DEVICE")
    ap.add_argument("--op", default=FUSED_OP, help="module:function to check")
    args = ap.parse_args(argv)
    module, name = args.op.split(":")
    fused = getattr(importlib.import_module(module), name)
    try:
        ok, detail = selfcheck(args.selfcheck, fused)
    except Exception as e:  # a raised error is a failed verdict, not a crash
        ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    print(json.dumps({"ok": ok, "detail": detail}), flush=True)


# ---------------------------------------------------------------------------------------------
# CPU: the fastest of fused, naive and sdpa for each shape


NAIVE_MAX_BYTES = 2 ** 30  # naive/sdpa are not tried where their (B, N, N) matrices would pass 1 GiB
CPU_MARGIN = 0.9           # naive/sdpa are picked only if they take less than 0.9x the fused op's time


def _cpu_choice(q, k, v):
    B, d, c, N = _shape(q, v)
    grad = torch.is_grad_enabled()
    what = f"(B, d, c, N) = {(B, d, c, N)} {str(q.dtype).replace('torch.', '')} {'fwd+bwd' if grad else 'fwd'}"
    if 3 * B * N * N * 4 > NAIVE_MAX_BYTES:  # scores, probabilities and their gradient
        return "fused"
    key = f"{_device_key(q.device)} | {torch.get_num_threads()} threads | {what}"
    hit = _cache_get("cpu", key)
    if hit is None:
        ms = time_cpu({name: _IMPLS[name] for name in ("fused", "naive", "sdpa")}, q, k, v, grad)
        other = min(("naive", "sdpa"), key=ms.get)
        choice = other if ms[other] < CPU_MARGIN * ms["fused"] else "fused"  # near-ties: fused, O(N) memory
        hit = {"choice": choice, "ms": {n: round(t, 3) for n, t in ms.items()}}
        _cache_put("cpu", key, hit)
        _note(f"on the CPU, {what}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in ms.items())
              + f" -> {choice} (measured once, kept in {cache_path()})")
    return hit["choice"]


def time_cpu(fns, q, k, v, grad, reps=3):
    """{name: median ms} of each fn (forward, and backward if grad) on fresh inputs shaped like
    q, k, v; the functions take turns, so that a change in the machine's load hits all of them."""
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(x.shape, generator=g).to(x.dtype) for x in (q, k, v)]
    go = torch.randn(v.shape, generator=g).to(v.dtype)
    times = {name: [] for name in fns}
    for r in range(reps + 1):  # round 0 warms up
        for name, fn in fns.items():
            xs = [x.clone().requires_grad_(grad) for x in ins]
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                o = fn(*xs)
                if grad:
                    o.backward(go)
            if r:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    _selfcheck_main(sys.argv[1:])
