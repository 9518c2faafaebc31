"""
Benchmarks and the first-GPU check, printed as markdown.

    python bench.py attention                      # GPU: the UNIT shapes at B=8, fp32 and bf16
                                                   # CPU: the shapes listed in CPU_SHAPES, fp32 (~2 min)
    python bench.py attention --shapes encoder --dtypes bf16 --batch 1
    python bench.py attention --shape 64,512,4096  # any d,c,N[,B], repeatable
    python bench.py train                          # train.py: fp32 vs bf16, 1 vs 2 processes, compile
    python bench.py train --attn generator --sn --size 304x256 --width 64 --batch 8 --variants fp32,bf16
    python bench.py gpu-check [--out report.md]    # build, tests, sanitizer, bench, training steps
    python bench.py evaluate runs/NAME/ckpt.pt      # where evaluate.py's time goes

attention: o = v . softmax_keys(q^T k), no scale, q, k (B, d, N), v (B, c, N), timed as
  naive        torch.bmm + softmax + bmm (stores the B x N x N matrix)
  sdpa-*       F.scaled_dot_product_attention(scale=1.0) with one backend at a time; the
               (B, d, N) -> (B, 1, N, d) transposes are inside the timed region, as they are in
               the model; a backend that does not accept the shape prints "refused"
  fused        unit.ops.fused_attention (csrc/attention.cu on GPU, csrc/attention.cpp on CPU)
Times are medians (CUDA events on GPU, time.perf_counter on CPU) after warm-up; "MB" is the peak
memory allocated during one call above what was allocated before it (outputs and gradients
included; GPU only). TFLOP/s counts the algorithm's FLOPs, the same for every method:
  forward 2BN^2(d + c),  forward+backward 2BN^2(d + c) + 2BN^2(3d + 2c)
  (backward = recompute S, dV, dP, dQ, dK; naive does not recompute S but is credited the same).
"err" is ||o - o_ref|| / ||o_ref|| of the forward output on the first image, o_ref in float64.
After the table: per shape, the fused op's fwd+bwd speed-up over naive and over the fastest SDPA
backend, and what UNIT_ATTN=auto picks there (unit/backends.py's rule, on this run's times).

train: train.py itself, each run in a process of its own on the phantom of the chosen size (default:
  the poster's 304x256 / width 64 / batch 8 on a GPU, the CPU preset's 96x80 / 8 / 4 on a CPU):
  seconds per step from the times in its metrics.jsonl (after a warm-up fifth of the steps),
  images/s per domain summed over processes, and peak memory (CUDA: tensors; CPU: rank 0's RSS),
  for fp32, --amp bf16 and torchrun with 2 processes (gloo on the CPU with half the threads each;
  NCCL on 2 GPUs); then the model's passes eager vs torch.compile (train.py has no --compile).

gpu-check: what the first GPU this project gets should run, in one command and under ~8 minutes
on an H100; it prints one markdown report (README's Performance section takes it as it is):
the CUDA build for this GPU, the fused op's self-check, the CUDA tests of
tests/test_attention_op.py, compute-sanitizer memcheck, racecheck and synccheck on a small case,
`attention` at the UNIT shapes (B = 8, fp32 and bf16), 50 train.py steps of the poster's
configuration (304x256, width 64, batch 8) with --attn encoder, generator and discriminator on the
fused op and on SDPA, and `train` (fp32 vs bf16 vs compile) with --attn encoder. Without a GPU it
runs the CPU stand-ins (the emulated CUDA tests, the CPU self-check, the CPU bench, a few CPU-preset
steps) and lists what it could not run.
"""

import argparse
import datetime
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from unit.backends import attention_reference as naive_attention
from unit.backends import CPU_MARGIN, attention_sdpa
from unit.hardware import machine
from unit.model import attn_arg

ROOT = Path(__file__).resolve().parent
# name: (d, c, N, B); B None = the device's default (8 on GPU). GPU: 304x256 at width 64.
GPU_SHAPES = {"encoder": (64, 512, 4864, None), "generator": (32, 256, 19456, None),
              "discriminator": (32, 256, 1216, None)}      # at 304x256, width 64 (unit/model.py)
# CPU: issue 7's list, the UNIT shapes at the N the CPU bench always used, the encoder at its
# real N (B = 1), and the CPU preset's own shapes (96x80, width 8, batch 4)
CPU_SHAPES = {"encoder@1024": (64, 512, 1024, 1), "generator@2048": (32, 256, 2048, 1),
              "encoder": (64, 512, 4864, 1), "preset-encoder": (8, 64, 480, 4),
              "preset-generator": (4, 32, 1920, 4)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_BACKENDS = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]


def make_sdpa(backend_name):
    """unit.backends.attention_sdpa restricted to one SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def sdpa_attention(q, k, v):
        with sdpa_kernel(backend):
            return attention_sdpa(q, k, v)

    return sdpa_attention


def reference_o(q, k, v):
    """float64 naive attention of the first image (for the err column)."""
    q, k, v = (x[:1].double() for x in (q, k, v))
    return naive_attention(q, k, v)


def stamp(device):
    return f"{machine(device)}, torch {torch.__version__}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"


# -----------------------------------------------------------------------------
# timing and memory


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(one_call_ms(fn, device) for _ in range(iters))


def peak_extra_mb(fn, device):
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_flops(B, d, c, N):
    fwd = 2 * B * N * N * (d + c)
    bwd = 2 * B * N * N * (3 * d + 2 * c)
    return fwd, fwd + bwd


def matmul_tflops(device, dtype, n, warmup, iters):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Refused(Exception):
    pass


def refusing(fn):
    """Run fn(); SDPA's error for "no backend accepts this" becomes Refused(reason)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        except RuntimeError as e:
            # CUDA: "No available kernel. Aborting execution."; CPU: "No viable backend ..."
            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                raise
            # SDPA warns why each backend declined; keep the specific lines, not the headers
            why = [str(w.message).splitlines()[0] for w in caught]
            why = [w for w in why if "not used because" not in w] or [str(e).splitlines()[0]]
            raise Refused("; ".join(why[:2]))


def one_call_ms(fn, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_methods(methods, q, k, v, grad_o, device, warmup, iters):
    """-> {name: dict(err, fwd_ms, fwd_mb, fb_ms, fb_mb) or dict(fail=why)}. Each method is tried
    once (SDPA may refuse a shape, naive may run out of memory), then the methods take turns in
    every timed round, so a change in the machine's load hits all of them alike."""
    res, calls = {}, {"fwd": {}, "fb": {}}
    for name, method in methods.items():
        def fwd(method=method):
            with torch.no_grad():
                return method(q, k, v)

        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

        def fwd_bwd(method=method, qg=qg, kg=kg, vg=vg):
            qg.grad = kg.grad = vg.grad = None
            method(qg, kg, vg).backward(grad_o)

        try:
            o = refusing(fwd)
            ref = reference_o(q, k, v)
            res[name] = {"err": ((o[:1].double() - ref).norm() / ref.norm()).item()}
            del o, ref
            calls["fwd"][name] = fwd
            refusing(fwd_bwd)
            calls["fb"][name] = fwd_bwd
        except Refused as e:
            res.setdefault(name, {})["fail"] = f"refused: {str(e)[:160]}"
        except torch.cuda.OutOfMemoryError:
            res.setdefault(name, {})["fail"] = "OOM"
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            res.setdefault(name, {})["fail"] = "OOM"
        gc.collect()
    for phase, fns in calls.items():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync(device)
        times = {name: [] for name in fns}
        for _ in range(iters):
            for name, fn in fns.items():
                times[name].append(one_call_ms(fn, device))
        for name, fn in fns.items():
            res[name][f"{phase}_ms"] = statistics.median(times[name])
            res[name][f"{phase}_mb"] = peak_extra_mb(fn, device)
    return res


# -----------------------------------------------------------------------------
# python bench.py attention


def pick_shapes(device, names, extra, batch):
    """-> {name: (d, c, N, B)} from --shapes names and --shape d,c,N[,B] strings."""
    table = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    default_b = 8 if device == "cuda" else 1
    shapes = {}
    for name in filter(None, (names or ",".join(table)).split(",")):
        if name not in table:
            raise SystemExit(f"bench.py: unknown shape {name!r} in --shapes; on {device} choose from {list(table)}.")
        shapes[name] = table[name]
    for s in extra or []:
        try:
            vals = [int(x) for x in s.split(",")]
            assert len(vals) in (3, 4)
        except (ValueError, AssertionError):
            raise SystemExit(f"bench.py: --shape wants d,c,N or d,c,N,B (integers), got {s!r}.")
        shapes["d%dc%dN%d" % tuple(vals[:3])] = tuple(vals) + (None,) * (4 - len(vals))
    return {n: (d, c, N, batch or B or default_b) for n, (d, c, N, B) in shapes.items()}


def attention_table(device, shapes, dtypes, warmup, iters, log=print):
    """Time every method at every (shape, dtype); prints (through log) the markdown table and the
    ratio summary; -> the summary rows."""
    methods = {"naive": naive_attention}
    for b in SDPA_BACKENDS if device == "cuda" else ["MATH"]:  # on the CPU only MATH takes d_v != d_qk
        methods["sdpa-" + b.lower().replace("_attention", "")] = make_sdpa(b)
    fused_note = None
    from unit import ops
    if ops.load(verbose=True) and ops.supports(device):
        methods["fused"] = ops.fused_attention
    else:
        fused_note = "fused: unavailable (" + ((ops.load_error() or "no kernels for this device").strip()
                                               .splitlines()[0][:200]) + ")"
    if device == "cuda":
        ref_rate = matmul_tflops(device, torch.bfloat16, 8192, 3, 10)
        ref_line = f"bf16 matmul 8192^3: {ref_rate:.0f} TFLOP/s (40% of it: {0.4 * ref_rate:.0f})"
    else:
        ref_line = f"fp32 matmul 1024^3: {matmul_tflops(device, torch.float32, 1024, 1, 5) * 1e3:.0f} GFLOP/s"
    log(f"\n## attention  ({stamp(device)})\n")
    log(f"{ref_line}; median of {iters} after {warmup} warm-up; FLOPs: fwd 2BN^2(d+c), fwd+bwd 2BN^2(4d+3c)")
    if fused_note:
        log(fused_note)
    log("")
    unit, scale = ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)
    log(f"| shape (d, c, N) | B | dtype | method | fwd ms | fwd {unit} | fwd MB | fwd+bwd ms | fwd+bwd {unit} "
        "| fwd+bwd MB | err |")
    log("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes, summary = [], []
    mb = lambda x: "-" if x is None else f"{x:.0f}"
    for sname, (d, c, N, B) in shapes.items():
        flops_f, flops_fb = attention_flops(B, d, c, N)
        for dt in dtypes:
            dtype = DTYPES[dt]
            # scaled so that q.k ~ N(0, 1): a non-degenerate softmax (timing does not depend on it)
            q = (torch.randn(B, d, N, device=device) * d**-0.25).to(dtype)
            k = (torch.randn(B, d, N, device=device) * d**-0.25).to(dtype)
            v = torch.randn(B, c, N, device=device).to(dtype)
            grad_o = torch.randn(B, c, N, device=device).to(dtype)
            res = run_methods(methods, q, k, v, grad_o, device, warmup, iters)
            fb = {m: r["fb_ms"] for m, r in res.items() if "fb_ms" in r}
            tf = lambda fl, ms: fl / (ms * 1e-3) / scale
            for mname, r in res.items():
                row = f"| {sname} ({d}, {c}, {N}) | {B} | {dt} | {mname} |"
                if "fwd_ms" in r:
                    row += f" {r['fwd_ms']:.2f} | {tf(flops_f, r['fwd_ms']):.1f} | {mb(r['fwd_mb'])} |"
                    row += (f" {r['fb_ms']:.2f} | {tf(flops_fb, r['fb_ms']):.1f} | {mb(r['fb_mb'])} |" if "fb_ms" in r
                            else f" {r['fail'].split(':')[0]} | | |")
                    row += f" {r['err']:.1e} |"
                else:
                    row += f" {r['fail'].split(':')[0]} | | | | | | |"
                if "fail" in r and r["fail"] != "OOM":
                    notes.append(f"{mname} {dt} {sname}{' backward' if 'fwd_ms' in r else ''}: {r['fail']}")
                log(row)
            summary.append((sname, (d, c, N), B, dt, fb, auto_pick(device, q, k, v, fb)))
            del q, k, v, grad_o
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    if notes:
        log("\nnotes:")
        for n in notes:
            log(f" - {n}")
    log("\nfused fwd+bwd speed-up (time of the other / time of fused; > 1: fused is faster), and what "
        "UNIT_ATTN=auto picks:\n")
    log("| shape (d, c, N) | B | dtype | vs naive | vs fastest SDPA | auto picks |")
    log("|---|---:|---|---:|---:|---|")
    for sname, dcn, B, dt, fb, pick in summary:
        sdpa = {m: t for m, t in fb.items() if m.startswith("sdpa")}
        best = min(sdpa, key=sdpa.get) if sdpa else None
        ratio = lambda t: f"{t / fb['fused']:.2f}x" if "fused" in fb and t else "-"
        log(f"| {sname} {dcn} | {B} | {dt} | {ratio(fb.get('naive'))} | "
            f"{ratio(sdpa.get(best)) + (f' ({best})' if best else '')} | {pick} |")
    return summary


def auto_pick(device, q, k, v, fb):
    """What UNIT_ATTN=auto picks for this shape: unit/backends.py's rule applied to this run's
    times (on the CPU its own measurement may differ), the self-check taken as passed."""
    from unit import ops
    if device == "cuda":
        if not ops.supports("cuda"):
            return "sdpa (no CUDA kernels built)"
        why = ops.cuda_unsupported(q, k, v)
        return f"sdpa ({why})" if why else "fused"
    others = {"naive": fb.get("naive"), "sdpa": fb.get("sdpa-math")}
    others = {n: t for n, t in others.items() if t is not None}
    if "fused" not in fb or not others:
        return "fused" if "fused" in fb else "naive"
    best = min(others, key=others.get)
    return best if others[best] < CPU_MARGIN * fb["fused"] else "fused"


def cmd_attention(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda was asked for but torch sees no GPU; use --device cpu.")
    torch.manual_seed(0)
    dtypes = (args.dtypes or ("fp32,bf16" if device == "cuda" else "fp32")).split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            raise SystemExit(f"bench.py: unknown dtype {dt!r} in --dtypes; choose from {list(DTYPES)}.")
    shapes = pick_shapes(device, args.shapes, args.shape, args.batch)
    attention_table(device, shapes, dtypes, args.warmup, args.iters or (10 if device == "cuda" else 3))


# -----------------------------------------------------------------------------
# python bench.py train


TRAIN_VARIANTS = ("fp32", "bf16", "2proc", "compile")


def train_run(device, size, width, batch, flags, steps, nproc=1, env=None):
    """Run train.py (under torchrun when nproc > 1) for `steps` steps on the phantom of `size`, in a
    process of its own; -> dict(s_step, peak_mb, finite) or dict(error). s/step is measured between
    the first log line (step steps/5: warm-up, the attention dispatch's first choices) and the last,
    from the times train.py writes in metrics.jsonl; peak memory is the one logged by rank 0."""
    import json
    import tempfile
    log_every = max(steps // 5, 1)
    with tempfile.TemporaryDirectory() as out:
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
               if nproc > 1 else [sys.executable]) + [
            "train.py", "--full", "--device", device, "--size", size, "--width", str(width), "--batch-size",
            str(batch), "--max-steps", str(steps), "--log-every", str(log_every), "--eval-every", "0",
            "--save-epochs", "", "--out", out, *flags]
        rc, secs, text = run(cmd, 1800, env=env)
        if rc:
            oom = "out of memory" in text.lower()
            last = next((l for l in reversed(text.splitlines()) if "Error" in l or "error:" in l), f"exit {rc}")
            return {"error": "OOM" if oom else last.strip()[:120]}
        lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    lines = [m for m in lines if m["kind"] == "train"]
    first, last = lines[0], lines[-1]
    finite = all(v == v and abs(v) != float("inf") for m in lines for k, v in m.items() if k in ("D", "G"))
    return {"s_step": (last["time"] - first["time"]) / (last["step"] - first["step"]), "peak_mb": last["peak_mem_mb"],
            "finite": finite}


def passes_ms(device, size, width, batch, attn, sn, amp, compiled, iters):
    """(compile s, ms per iteration) of the model's training passes (cycle() + discriminate(), forward
    and backward of a plain sum, no optimizer), eager or under torch.compile. train.py has no
    --compile: this measures whether it would pay."""
    from unit.model import UNIT
    H, W = (int(x) for x in size.lower().split("x"))
    torch.manual_seed(0)
    model = UNIT(width=width, attn=attn, sn=sn).to(device)
    g, d = model.generator_side(), model.discriminator_side()
    if compiled:
        g, d = torch.compile(g), torch.compile(d)
    x_a, x_b = (torch.rand(batch, 1, H, W, device=device) * 2 - 1 for _ in range(2))

    def it():
        with torch.autocast(device, torch.bfloat16, enabled=amp == "bf16"):
            o = g(x_a, x_b, [None] * 4)
            l_a, l_b = d(o["x_ba"], o["x_ab"])                  # lists of logit maps
        (sum(v.float().mean() for v in o.values()) + sum(m.float().mean() for m in l_a + l_b)).backward()

    t0 = time.time()
    it()
    sync(device)
    first = time.time() - t0
    return first, median_ms(it, device, 1, iters)


def cmd_train(args):
    """The table of issue 8: train.py's speed and peak memory, fp32 vs --amp bf16, 1 vs 2 processes
    (torchrun: gloo on the CPU, NCCL on 2 GPUs), and eager vs torch.compile on the model's passes."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    size = args.size or ("304x256" if gpu else "96x80")
    width, batch = args.width or (64 if gpu else 8), args.batch or (8 if gpu else 4)
    steps = args.steps or (60 if gpu else 25)
    variants = args.variants.split(",") if args.variants else TRAIN_VARIANTS
    flags = ["--attn", args.attn] + ["--sn"] * args.sn + ["--charbonnier"] * args.charbonnier
    backend = os.environ.get("UNIT_ATTN", "auto")
    print(f"\n## train.py  ({stamp(device)})\n")
    print(f"{size}, width {width}, batch {batch} per domain and process, --attn {args.attn}"
          f"{' --sn' if args.sn else ''}{' --charbonnier' if args.charbonnier else ''}, UNIT_ATTN={backend}; "
          f"{steps} steps, timed after the first {max(steps // 5, 1)}; each run in its own process\n")
    print("| run | processes | s/step | images/s (all processes) | vs fp32 | peak memory (rank 0) | losses finite |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = [("fp32", [], 1), ("bf16", ["--amp", "bf16"], 1)]
    n2 = 2 if not gpu or torch.cuda.device_count() >= 2 else 0
    if n2:
        rows.append(("2proc", [], 2))
    base = None
    for name, extra, nproc in rows:
        if name not in variants:
            continue
        env = {"OMP_NUM_THREADS": str(max(os.cpu_count() // nproc, 1))} if not gpu else None
        r = train_run(device, size, width, batch, flags + extra, steps, nproc, env)
        label = {"fp32": "fp32", "bf16": "--amp bf16", "2proc": f"fp32, torchrun ({'NCCL' if gpu else 'gloo'})"}[name]
        if "error" in r:
            print(f"| {label} | {nproc} | {r['error']} | | | | |")
            continue
        ips = nproc * batch / r["s_step"]
        base = base or (ips if name == "fp32" else None)
        mem = f"{r['peak_mb'] / 1024:.2f} GiB" + (" (tensors)" if gpu else " (RSS)")
        print(f"| {label} | {nproc} | {r['s_step']:.3f} | {ips:.1f} | {f'{ips / base:.2f}x' if base else '-'} | "
              f"{mem} | {r['finite']} |", flush=True)
    if "2proc" in variants and not n2:
        print(f"| fp32, torchrun | 2 | not run: {torch.cuda.device_count()} GPU | | | | |")
    if "compile" in variants:
        print("\nthe model's passes (cycle + discriminate, forward + backward; no optimizer), eager vs torch.compile:\n")
        print("| amp | eager ms/iter | compiled ms/iter | compiled / eager | first compiled call (compile) |")
        print("|---|---:|---:|---:|---:|")
        for amp in (["fp32", "bf16"] if gpu else ["fp32"]):
            iters = 10 if gpu else 3
            try:
                _, eager = passes_ms(device, size, width, batch, args.attn, args.sn, amp, False, iters)
                first, comp = passes_ms(device, size, width, batch, args.attn, args.sn, amp, True, iters)
                print(f"| {amp} | {eager:.1f} | {comp:.1f} | {comp / eager:.2f} | {first:.0f} s |", flush=True)
            except Exception as e:  # a compile failure is a result too
                print(f"| {amp} | | failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''} | | |")


# -----------------------------------------------------------------------------
# python bench.py gpu-check


def run(cmd, timeout, env=None):
    """-> (returncode, seconds, output); a command that cannot start or times out returns 127/124."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return p.returncode, time.time() - t0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, time.time() - t0, f"timed out after {timeout} s\n{e.stdout or ''}"
    except OSError as e:
        return 127, time.time() - t0, str(e)


def pytest_summary(out):
    m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", out, re.M)
    return m[-1] if m else out.strip().splitlines()[-1][:200] if out.strip() else "(no output)"


SANITIZER_CASE = """
import sys, torch
sys.path.insert(0, {root!r})
from unit import ops
assert ops.load(verbose=False) and ops.supports("cuda"), ops.load_error()
for dtype in (torch.float32, torch.bfloat16):
    for B, d, c, N in ((1, 64, 130, 136), (2, 32, 40, 77)):  # cp.async and element paths, c-splits, key-splits
        q, k = ((torch.randn(B, d, N, device="cuda") * 0.3).to(dtype).requires_grad_() for _ in range(2))
        v = torch.randn(B, c, N, device="cuda").to(dtype).requires_grad_()
        ops.fused_attention(q, k, v).float().sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
"""


def cmd_gpu_check(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.time()
    lines, not_run = [], []
    log = lambda s="": (print(s, flush=True), lines.append(s))
    py = sys.executable
    log(f"# gpu-check ({stamp(device)})")
    log(f"\ncommand: `python bench.py gpu-check`; {'GPU present' if device == 'cuda' else 'no GPU: CPU stand-ins'}\n")

    # 1. build
    from unit import ops
    from torch.utils.cpp_extension import CUDA_HOME
    t0 = time.time()
    ok = ops.load(verbose=True)
    built = "cuda + cpu" if ops.supports("cuda") else "cpu only" if ok else "failed"
    log(f"- build: {built} ({time.time() - t0:.0f} s); nvcc {ops._nvcc_version(CUDA_HOME) if CUDA_HOME else 'not found'}"
        + (f"; {ops.load_error().strip().splitlines()[0][:200]}" if ops.load_error() else ""))
    if device == "cpu":
        not_run.append("the CUDA build (no GPU)")

    # 2. self-check in a child process (what auto runs on first use)
    import unit.backends as A
    t0 = time.time()
    verdict = A.run_selfcheck(device)
    log(f"- self-check on {device} (child process): {'passed' if verdict['ok'] else 'FAILED'}: "
        f"{verdict['detail']} ({time.time() - t0:.0f} s)")

    # 3. tests
    if device == "cuda":
        rc, secs, out = run([py, "-m", "pytest", "-q", "-rs", "tests/test_attention_op.py", "-k", "cuda"], 600)
        log(f"- CUDA tests (tests/test_attention_op.py -k cuda): {pytest_summary(out)} ({secs:.0f} s)")
        if rc:
            log("```\n" + "\n".join(l for l in out.splitlines() if l.startswith(("FAILED", "ERROR", "E ")))[:3000] + "\n```")
    else:  # the stand-in: attention.cu run on the CPU (CI runs these too, so not on a GPU machine)
        not_run.append("the CUDA tests of tests/test_attention_op.py (no GPU)")
        rc, secs, out = run([py, "-m", "pytest", "-q", "-m", "cuda_emu", "tests/test_cuda_emu.py"], 900)
        log(f"- emulated CUDA tests (tests/test_cuda_emu.py, attention.cu run on the CPU): {pytest_summary(out)} "
            f"({secs:.0f} s)")

    # 4. compute-sanitizer
    sanitizer = shutil.which("compute-sanitizer") or (CUDA_HOME and shutil.which(
        "compute-sanitizer", path=os.path.join(CUDA_HOME, "bin")))
    if device == "cuda" and sanitizer and ops.supports("cuda"):
        case = SANITIZER_CASE.format(root=str(ROOT))
        # memcheck on everything; racecheck and synccheck (slow) on our kernels only (names attn_...)
        for tool, only_ours in (("memcheck", False), ("racecheck", True), ("synccheck", True)):
            flt = ["--kernel-name", "kns=attn_"] if only_ours else []
            rc, secs, out = run([sanitizer, "--tool", tool, *flt, "--error-exitcode", "99", py, "-c", case], 600)
            summary = next((l for l in out.splitlines() if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l),
                           out.strip().splitlines()[-1] if out.strip() else "")
            log(f"- compute-sanitizer {tool}: {'clean' if rc == 0 else f'exit {rc}'}: {summary.strip()} ({secs:.0f} s)")
    else:
        not_run.append("compute-sanitizer memcheck, racecheck and synccheck (" + ("no GPU" if device == "cpu" else
                       "no compute-sanitizer found" if not sanitizer else "no CUDA kernels built") + ")")

    # 5. the attention bench
    if device == "cuda":
        shapes = pick_shapes("cuda", None, None, 8)
        attention_table("cuda", shapes, ["fp32", "bf16"], 2, 10, log)
    else:
        not_run.append("`bench.py attention` at the UNIT shapes with B = 8 on a GPU (fp32, bf16)")
        attention_table("cpu", pick_shapes("cpu", None, None, None), ["fp32"], 1, 3, log)

    # 6. train.py: each attention backend (fp32), then fp32 vs bf16 vs compile on auto's choice
    if device == "cpu":
        not_run.append("train.py at the poster configuration (304x256, width 64, batch 8) on a GPU; ran the CPU "
                       "preset's size (96x80, width 8, batch 4) instead")
    log("\n## train.py (`bench.py train`, each run in its own process)\n")
    steps = "50" if device == "cuda" else "10"
    log(f"fp32, --sn --charbonnier, the size of `bench.py train` on this device, {steps} steps:\n")
    log("| attn | UNIT_ATTN | s/step | images/s | peak memory | losses finite |")
    log("|---|---|---:|---:|---:|---|")
    for attn in ("encoder", "generator", "discriminator"):
        for backend in (("fused", "sdpa") if device == "cuda" else ("fused",)):
            rc, secs, out = run([py, "bench.py", "train", "--device", device, "--attn", attn, "--sn", "--charbonnier",
                                 "--steps", steps, "--variants", "fp32"], 900, env={"UNIT_ATTN": backend})
            row = next((l.split("|") for l in out.splitlines() if l.startswith("| fp32 |")), None)
            if rc == 0 and row and len(row) == 9:   # | fp32 | 1 | s/step | img/s | vs | memory | finite |
                log(f"| {attn} | {backend} |{row[3]}|{row[4]}|{row[6]}|{row[7]}|")
            else:
                why = row[3].strip() if row else f"exit {rc}: " + (out.strip().splitlines() or [""])[-1][:150]
                log(f"| {attn} | {backend} | {why} | | | |")
    log()
    variants = ",".join(TRAIN_VARIANTS) if device == "cuda" else "fp32,2proc"   # bf16 and compile: minutes on a CPU
    if device == "cpu":
        not_run.append("`bench.py train` with --amp bf16 and torch.compile on a GPU")
    rc, secs, out = run([py, "bench.py", "train", "--device", device, "--attn", "encoder", "--sn", "--charbonnier",
                         "--steps", steps, "--variants", variants], 1200)
    for line in out.splitlines()[2:]:
        log(line)

    log("\n## not run here\n")
    for n in not_run or ["(everything ran)"]:
        log(f"- {n}")
    log(f"\ngpu-check took {time.time() - t_start:.0f} s")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\nreport written to {args.out}")


# -----------------------------------------------------------------------------


def cmd_evaluate(args):
    """unit.evaluation.evaluate() taken apart and timed once (wall and CPU seconds): the translations of the whole
    test split, per_slice() and subject_scores() of the two directions, and reference_scores(), which evaluate.py
    computes once for all its checkpoints."""
    import resource
    from unit.checkpoint import load_model
    from unit.data import load_prepared
    from unit.evaluation import per_slice, reference_scores, subject_scores, test_split, translate
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt = load_model(args.ckpt, device)
    data = load_prepared(args.data or ckpt["config"]["data"])
    rows = []

    def timed(name, fn):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn()
        sync(device)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((name, time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
        return out
    t1, t2, mask, ids = timed("read the test split", lambda: test_split(data))
    ch = ckpt["config"]["channels"]
    fake = timed("translate both directions", lambda: (translate(model, t2, "b", device, ch), translate(model, t1, "a", device, ch)))
    timed("metrics of both directions", lambda: [subject_scores(per_slice(f, real, mask), ids) for f, real in zip(fake, (t1, t2))])
    timed("reference rows (once per call)", lambda: reference_scores(data))
    H, W = data.shape
    print(f"## evaluate: {len(ids)} test slices of {H}x{W} from {len(set(ids))} subjects, width "
          f"{ckpt['config']['width']}; {stamp(device)}\n")
    print("| part | wall s | user s | sys s |\n|---|---|---|---|")
    for name, wall, user, sys_ in rows:
        print(f"| {name} | {wall:.1f} | {user:.1f} | {sys_:.1f} |")
    print(f"| total | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} | {sum(r[3] for r in rows):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="naive vs SDPA backends vs the fused op, forward and backward")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--batch", type=int, default=None, help="B for every shape (default: 8 on GPU, the shape's on CPU)")
    p.add_argument("--shapes", default=None, help="comma list of named shapes (default: all of the device's: "
                   f"GPU {', '.join(GPU_SHAPES)}; CPU {', '.join(CPU_SHAPES)})")
    p.add_argument("--shape", action="append", help="extra shape d,c,N or d,c,N,B (repeatable)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default fp32,bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 10 on GPU, 3 on CPU)")
    p.set_defaults(func=cmd_attention)
    t = sub.add_parser("train", help="train.py's speed and memory: fp32 vs bf16, 1 vs 2 processes, eager vs compile")
    t.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    t.add_argument("--size", default=None, help="HxW (default 304x256 on GPU, 96x80 on CPU)")
    t.add_argument("--width", type=int, default=None, help="model width (default 64 on GPU, 8 on CPU)")
    t.add_argument("--batch", type=int, default=None, help="images per domain and process (default 8 GPU, 4 CPU)")
    t.add_argument("--attn", default="encoder", type=attn_arg, help="none, or places joined by '+' as train.py's")
    t.add_argument("--sn", action="store_true")
    t.add_argument("--charbonnier", action="store_true")
    t.add_argument("--steps", type=int, default=None, help="train.py steps per run (default 60 GPU, 25 CPU)")
    t.add_argument("--variants", default=None, help=f"comma list of {','.join(TRAIN_VARIANTS)} (default all)")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="where evaluate.py's time goes: translation, the model's metrics, the "
                                        "data's reference rows")
    e.add_argument("ckpt", help="a checkpoint written by train.py")
    e.add_argument("--data", default=None, help="prepared dataset (default: the checkpoint's)")
    e.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    e.set_defaults(func=cmd_evaluate)
    g = sub.add_parser("gpu-check", help="the first-GPU validation: build, self-check, tests, sanitizer, bench, "
                                         "training steps")
    g.add_argument("--out", default=None, help="also write the markdown report to this file")
    g.set_defaults(func=cmd_gpu_check)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
