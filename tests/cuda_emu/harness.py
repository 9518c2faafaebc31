"""ctypes driver for a library built by tests/cuda_emu/build.py: device buffers, and the C entry
points of csrc/attention_cuda.h called as csrc/attention.cpp calls them on a GPU.

    dev = EmuDevice(build())
    o, lse = dev.fwd(q, k, v)                  # torch CPU tensors in, torch CPU tensors out
    dq, dk, dv = dev.bwd(grad_o, q, k, v, o, lse)

Every call runs on fresh emulated allocations (NaN-filled, so an output element the kernels never
write stays NaN) on a stream the emulator checks every launch against. An emulator error raises
EmuError with the emulator's message.
"""
import ctypes

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # unit_attn_dtype
STREAM = ctypes.c_void_p(0x5EA5)  # a fake stream: launches on any other (e.g. the default) fail


class EmuError(RuntimeError):
    pass


class EmuDevice:
    def __init__(self, lib_path, stream_check=True):
        self.lib = lib = ctypes.CDLL(str(lib_path))
        vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.emu_malloc.restype, lib.emu_malloc.argtypes = vp, [sz, ctypes.c_char_p]
        lib.emu_free.argtypes = [vp]
        lib.emu_h2d.argtypes = lib.emu_d2h.argtypes = [vp, vp, sz]
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_stat.restype, lib.emu_stat.argtypes = ctypes.c_long, [ctypes.c_char_p]
        lib.emu_configure.argtypes = [i, i, i, i, i, i]
        lib.emu_set_device.argtypes = [i]
        lib.emu_expect_stream.argtypes = [vp]
        if hasattr(lib, "unit_attn_fwd"):  # csrc/attention_cuda.h (not in selftest.cu's library)
            lib.unit_attn_fwd.restype = i
            lib.unit_attn_fwd.argtypes = [i, vp, vp, vp, vp, vp, i, i, i, i, vp]
            lib.unit_attn_bwd.restype = i
            lib.unit_attn_bwd.argtypes = [i, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i, i, i, i, vp]
            lib.unit_attn_bwd_workspace_bytes.restype = sz
            lib.unit_attn_bwd_workspace_bytes.argtypes = [i, i, i, i, i]
            lib.unit_attn_supported.restype = i
            lib.unit_attn_supported.argtypes = [i, i, i, i, i, ctypes.POINTER(ctypes.c_char_p)]
        if stream_check:
            lib.emu_expect_stream(STREAM)
        self.devices = {}
        self.use_device()
        self._live = []

    def use_device(self, sms=132, cc=(9, 0), smem_block_optin=227 * 1024, smem_sm=228 * 1024):
        """Make an emulated GPU with these properties current (default: an H100 SXM). Each distinct
        set of properties is a device of its own, as the kernels cache what they learn per device."""
        key = (sms, cc, smem_block_optin, smem_sm)
        if key not in self.devices:
            self.devices[key] = len(self.devices)
            self.lib.emu_configure(self.devices[key], sms, cc[0], cc[1], smem_block_optin, smem_sm)
        self.lib.emu_set_device(self.devices[key])

    def reset(self):
        self.lib.emu_reset()

    def stat(self, name):
        return self.lib.emu_stat(name.encode())

    def error(self):
        return self.lib.emu_error().decode()

    # -- allocations ----------------------------------------------------------------------
    def alloc(self, nbytes, name, offset=0):
        """An emulated device allocation; the returned pointer is `offset` bytes past its start."""
        base = self.lib.emu_malloc(nbytes + offset, name.encode())
        self._live.append(base)
        return base + offset

    def upload(self, t, name, offset=0):
        t = t.contiguous()
        p = self.alloc(t.numel() * t.element_size(), name, offset)
        if offset:  # the bytes before the tensor are initialised too (they are never read)
            pad = torch.zeros(offset, dtype=torch.uint8)
            self.lib.emu_h2d(p - offset, pad.data_ptr(), offset)
        assert self.lib.emu_h2d(p, t.data_ptr(), t.numel() * t.element_size()) == 0
        return p

    def download(self, p, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        assert self.lib.emu_d2h(t.data_ptr(), p, t.numel() * t.element_size()) == 0
        return t

    def free_all(self):
        for p in self._live:
            self.lib.emu_free(p)
        self._live = []

    def check(self, rc, what):
        if rc != 0:
            msg = self.error() or "(no message)"
            self.reset()
            self.free_all()
            raise EmuError(f"{what} returned CUDA error {rc}: {msg}")

    # -- the op ---------------------------------------------------------------------------
    def supported(self, dtype, B, d, c, N):
        """None if the kernels can run these sizes on the current device, else the reason."""
        why = ctypes.c_char_p()
        self.check(self.lib.unit_attn_supported(DTYPE_CODE[dtype], B, d, c, N, ctypes.byref(why)),
                   "unit_attn_supported")
        return why.value.decode() if why.value else None

    def fwd(self, q, k, v, offset=0):
        """o, lse = attention_fwd(q, k, v) on the emulated GPU; offset (bytes) misaligns q, k, v."""
        B, d, N = q.shape
        c = v.shape[1]
        try:
            pq, pk, pv = (self.upload(t, n, offset) for t, n in ((q, "q"), (k, "k"), (v, "v")))
            po = self.alloc(B * c * N * q.element_size(), "o")
            pl = self.alloc(B * N * 4, "lse")
            rc = self.lib.unit_attn_fwd(DTYPE_CODE[q.dtype], pq, pk, pv, po, pl, B, d, c, N, STREAM)
            self.check(rc, "unit_attn_fwd")
            return self.download(po, (B, c, N), q.dtype), self.download(pl, (B, N), torch.float32)
        finally:
            self.free_all()

    def bwd(self, grad_o, q, k, v, o, lse, offset=0):
        """dq, dk, dv = attention_bwd(...) on the emulated GPU (workspace as attention.cpp sizes it)."""
        B, d, N = q.shape
        c = v.shape[1]
        code = DTYPE_CODE[q.dtype]
        try:
            ins = [self.upload(t, n, offset) for t, n in ((q, "q"), (k, "k"), (v, "v"), (o, "o"), (grad_o, "grad_o"))]
            pl = self.upload(lse.float(), "lse")
            pdq, pdk = (self.alloc(B * d * N * q.element_size(), n) for n in ("dq", "dk"))
            pdv = self.alloc(B * c * N * q.element_size(), "dv")
            ws = self.lib.unit_attn_bwd_workspace_bytes(code, B, d, c, N)
            pws = self.alloc(max(ws, 256), "workspace")
            pq, pk, pv, po, pgo = ins
            rc = self.lib.unit_attn_bwd(code, pq, pk, pv, po, pl, pgo, pdq, pdk, pdv, pws, B, d, c, N, STREAM)
            self.check(rc, "unit_attn_bwd")
            return (self.download(pdq, (B, d, N), q.dtype), self.download(pdk, (B, d, N), q.dtype),
                    self.download(pdv, (B, c, N), q.dtype))
        finally:
            self.free_all()
