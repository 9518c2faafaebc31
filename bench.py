"""
Benchmarks, printed as markdown tables.

    python bench.py attention                      # UNIT shapes at B=8, fp32 and bf16 (GPU)
    python bench.py attention --batch 1 --dtypes bf16 --shapes encoder
    python bench.py attention --shape 64,512,4096  # any (d, c, N), repeatable
    python bench.py attention --device cpu         # reduced N, finishes in about a minute

attention: o = v . softmax_keys(q^T k), no scale, q, k (B, d, N), v (B, c, N), timed as
  naive        torch.bmm + softmax + bmm (stores the B x N x N matrix)
  sdpa-*       F.scaled_dot_product_attention(scale=1.0) with one backend at a time; the
               (B, d, N) -> (B, 1, N, d) transposes are inside the timed region, as they would be
               in the model; a backend that does not accept the shape prints "refused"
  fused        unit.ops.fused_attention (csrc/attention.cu on GPU, csrc/attention.cpp on CPU)
Times are medians (CUDA events on GPU, time.perf_counter on CPU) after warm-up; "MB" is the peak
memory allocated during one call above what was allocated before it (outputs and gradients
included; GPU only). TFLOP/s counts the algorithm's FLOPs, the same for every method:
  forward 2BN^2(d + c),  forward+backward 2BN^2(d + c) + 2BN^2(3d + 2c)
  (backward = recompute S, dV, dP, dQ, dK; naive does not recompute S but is credited the same).
"err" is ||o - o_ref|| / ||o_ref|| of the forward output on the first image, o_ref in float64.

    python bench.py train                          # one UNIT training iteration (D + G step)
    python bench.py train --attn encoder --sn --size 304x256 --width 64 --batch 8

train: median seconds per train.py iteration (train_step: one D step and one G step) on random
images, images/s (per domain), and peak memory on GPU; attention backend as train.py would pick.
"""

import argparse
import datetime
import gc
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

UNIT_SHAPES = {"encoder": (64, 512, 4864), "generator": (32, 256, 19456)}  # (d, c, N) at 304x256
CPU_N = {"encoder": 1024, "generator": 2048}  # --device cpu keeps d and c, shrinks N
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_BACKENDS = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]

# -----------------------------------------------------------------------------
# the methods: all take q, k (B, d, N), v (B, c, N) and return o (B, c, N)


from unit.attention import attention_reference as naive_attention  # bmm + softmax + bmm, (B, N, N) in memory


def make_sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def sdpa_attention(q, k, v):
        # SDPA wants (B, heads, N, features) with the feature dim contiguous
        qh = q.transpose(1, 2).contiguous().unsqueeze(1)
        kh = k.transpose(1, 2).contiguous().unsqueeze(1)
        vh = v.transpose(1, 2).contiguous().unsqueeze(1)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, 1, N, c)
        return o.squeeze(1).transpose(1, 2)

    return sdpa_attention


def reference_o(q, k, v):
    """float64 naive attention of the first image (for the err column)."""
    q, k, v = (x[:1].double() for x in (q, k, v))
    return naive_attention(q, k, v)


# -----------------------------------------------------------------------------
# timing and memory


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def run_case(method, q, k, v, grad_o, device, warmup, iters):
    """-> dict(err, fwd_ms, fwd_mb, fb_ms, fb_mb); raises Refused if the forward is refused.
    A refused backward leaves fb_ms = "refused" (and fb_refused = the reason)."""
    def fwd():
        with torch.no_grad():
            return method(q, k, v)

    o = refusing(fwd)
    ref = reference_o(q, k, v)
    out = {"err": ((o[:1].double() - ref).norm() / ref.norm()).item()}
    del o, ref
    out["fwd_ms"] = median_ms(fwd, device, warmup, iters)
    out["fwd_mb"] = peak_extra_mb(fwd, device)

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        method(qg, kg, vg).backward(grad_o)

    try:
        refusing(fwd_bwd)
    except Refused as e:
        out["fb_ms"], out["fb_mb"], out["fb_refused"] = "refused", None, str(e)
        return out
    out["fb_ms"] = median_ms(fwd_bwd, device, warmup, iters)
    qg.grad = kg.grad = vg.grad = None
    out["fb_mb"] = peak_extra_mb(fwd_bwd, device)
    return out


# -----------------------------------------------------------------------------
# python bench.py attention


def cmd_attention(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda was asked for but torch sees no GPU; use --device cpu.")
    torch.manual_seed(0)
    shapes = {}
    for name in filter(None, args.shapes.split(",")):
        if name not in UNIT_SHAPES:
            raise SystemExit(f"bench.py: unknown shape {name!r} in --shapes; choose from {list(UNIT_SHAPES)}.")
        d, c, N = UNIT_SHAPES[name]
        shapes[name] = (d, c, CPU_N[name] if device == "cpu" and not args.full else N)
    for s in args.shape or []:
        try:
            d, c, N = (int(x) for x in s.split(","))
        except ValueError:
            raise SystemExit(f"bench.py: --shape wants d,c,N (three integers), got {s!r}.")
        shapes[f"d{d}c{c}N{N}"] = (d, c, N)
    B = args.batch if args.batch is not None else (8 if device == "cuda" else 1)
    dtypes = (args.dtypes or ("fp32,bf16" if device == "cuda" else "fp32")).split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            raise SystemExit(f"bench.py: unknown dtype {dt!r} in --dtypes; choose from {list(DTYPES)}.")
    warmup, iters = args.warmup, args.iters or (10 if device == "cuda" else 3)

    methods = {"naive": naive_attention}
    backends = SDPA_BACKENDS if device == "cuda" else ["MATH"]
    for b in backends:
        methods["sdpa-" + b.lower().replace("_attention", "")] = make_sdpa(b)
    fused_note = None
    try:
        from unit.ops import fused_attention, load, load_error

        if load(verbose=True):
            methods["fused"] = fused_attention
        else:
            fused_note = "fused: unavailable (" + (load_error() or "").strip().splitlines()[0][:200] + ")"
    except ImportError as e:
        fused_note = f"fused: unavailable (cannot import unit.ops: {e})"

    if device == "cuda":
        name = torch.cuda.get_device_name()
        ref_rate = matmul_tflops(device, torch.bfloat16, 8192, 3, 10)
        ref_line = f"bf16 matmul 8192^3: {ref_rate:.0f} TFLOP/s (40% of it: {0.4 * ref_rate:.0f})"
    else:
        import platform

        name = platform.processor() or platform.machine()
        ref_rate = matmul_tflops(device, torch.float32, 1024, 1, 5)
        ref_line = f"fp32 matmul 1024^3: {ref_rate * 1e3:.0f} GFLOP/s"

    print(f"\n## attention  ({name}, torch {torch.__version__}, "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})\n")
    print(f"{ref_line}; B={B}; median of {iters} after {warmup} warm-up; "
          "FLOPs: fwd 2BN^2(d+c), fwd+bwd 2BN^2(4d+3c)")
    if fused_note:
        print(fused_note)
    print()
    unit, scale = ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)
    print(f"| shape (d, c, N) | dtype | method | fwd ms | fwd {unit} | fwd MB | fwd+bwd ms | fwd+bwd {unit} "
          "| fwd+bwd MB | err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    mb = lambda x: "-" if x is None else f"{x:.0f}"
    for sname, (d, c, N) in shapes.items():
        flops_f, flops_fb = attention_flops(B, d, c, N)
        for dt in dtypes:
            dtype = DTYPES[dt]
            # scaled so that q.k ~ N(0, 1): a non-degenerate softmax (timing does not depend on it)
            q = (torch.randn(B, d, N, device=device) * d**-0.25).to(dtype)
            k = (torch.randn(B, d, N, device=device) * d**-0.25).to(dtype)
            v = torch.randn(B, c, N, device=device).to(dtype)
            grad_o = torch.randn(B, c, N, device=device).to(dtype)
            for mname, method in methods.items():
                row = f"| {sname} ({d}, {c}, {N}) | {dt} | {mname} |"
                try:
                    r = run_case(method, q, k, v, grad_o, device, warmup, iters)
                    tf = lambda fl, ms: fl / (ms * 1e-3) / scale
                    row += f" {r['fwd_ms']:.2f} | {tf(flops_f, r['fwd_ms']):.1f} | {mb(r['fwd_mb'])} |"
                    if r["fb_ms"] == "refused":
                        row += " refused | | |"
                        notes.append(f"{mname} {dt} {sname} backward: {r['fb_refused'][:160]}")
                    else:
                        row += f" {r['fb_ms']:.2f} | {tf(flops_fb, r['fb_ms']):.1f} | {mb(r['fb_mb'])} |"
                    row += f" {r['err']:.1e} |"
                except Refused as e:
                    row += " refused | | | | | | |"
                    notes.append(f"{mname} {dt} {sname}: {str(e)[:160]}")
                except torch.cuda.OutOfMemoryError:
                    row += " OOM | | | | | | |"
                except RuntimeError as e:
                    if "out of memory" not in str(e).lower():
                        raise
                    row += " OOM | | | | | | |"
                print(row, flush=True)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    if notes:
        print("\nrefusals:")
        for n in notes:
            print(" -", n)


# -----------------------------------------------------------------------------
# python bench.py train


def cmd_train(args):
    from train import Config, make_optimizers, train_step
    from unit.attention import backend
    from unit.model import UNIT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    H, W = (int(x) for x in args.size.lower().split("x"))
    cfg = {**Config().__dict__, "attn": args.attn, "sn": args.sn, "charbonnier": args.charbonnier}
    torch.manual_seed(0)
    model = UNIT(channels=1, width=args.width, attn=args.attn, sn=args.sn).to(device)
    opt_g, opt_d = make_optimizers(model, cfg)
    x_a = torch.rand(args.batch, 1, H, W, device=device) * 2 - 1
    x_b = torch.rand(args.batch, 1, H, W, device=device) * 2 - 1
    step = lambda: train_step(model, opt_g, opt_d, x_a, x_b, cfg)   # .item() inside syncs the GPU
    iters = args.iters or (20 if device == "cuda" else 5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, device, args.warmup, iters)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "-"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n## train step  ({name}, torch {torch.__version__}, "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})\n")
    print("| size | width | batch | attn (backend) | sn | s/iter | images/s | peak memory |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    print(f"| {H}x{W} | {args.width} | {args.batch} | {args.attn} ({backend() if args.attn != 'none' else '-'}) "
          f"| {args.sn} | {ms / 1e3:.3f} | {args.batch / (ms / 1e3):.1f} | {peak} |")


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="naive vs SDPA backends vs the fused op, forward and backward")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--batch", type=int, default=None, help="B (default 8 on GPU, 1 on CPU)")
    p.add_argument("--shapes", default="encoder,generator", help="comma list of UNIT shapes: encoder, generator")
    p.add_argument("--shape", action="append", help="extra shape d,c,N (repeatable)")
    p.add_argument("--full", action="store_true", help="on CPU, keep the full UNIT N (slow)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default fp32,bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 10 on GPU, 3 on CPU)")
    p.set_defaults(func=cmd_attention)
    t = sub.add_parser("train", help="one UNIT training iteration (D + G step) on random images")
    t.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    t.add_argument("--size", default="304x256", help="HxW (default 304x256)")
    t.add_argument("--width", type=int, default=64, help="model width (default 64, the poster's)")
    t.add_argument("--batch", type=int, default=8, help="images per domain (default 8)")
    t.add_argument("--attn", default="none", choices=["none", "encoder", "generator", "both"])
    t.add_argument("--sn", action="store_true")
    t.add_argument("--charbonnier", action="store_true")
    t.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    t.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 on GPU, 5 on CPU)")
    t.set_defaults(func=cmd_train)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
