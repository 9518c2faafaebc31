"""SAGAN self-attention (Zhang et al. 2018) as the model sees it: the block, and a hook that records where
chosen points attend (evaluate.py --attention-maps). The op the block runs:

    attention(q, k, v) = v . softmax_keys(q^T k), no 1/sqrt(d) scale
    q, k: (B, d, N)   v: (B, c, N)   ->   o: (B, c, N)

The op's readable definition, attention_reference(), and the choice of the implementation that runs it inside
the model (that reference, torch's SDPA or the fused C++/CUDA op of csrc/; UNIT_ATTN=auto | naive | sdpa |
fused) are unit/backends.py's; every implementation is tested against the reference. The imports go one
way: this module imports unit/backends.py, which imports nothing of it.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from unit import backends


class SelfAttention(nn.Module):
    """SAGAN block: f = W_f x, g = W_g x (C/8 channels), h = W_h x (C channels),
    beta = softmax over positions, o = beta h, y = gamma * o + x with gamma initialised to 0,
    so the block starts as the identity and the network learns how much attention to use."""

    def __init__(self, channels):
        super().__init__()
        d = max(channels // 8, 1)
        self.f = nn.Conv2d(channels, d, 1)           # f(x_i): keys
        self.g = nn.Conv2d(channels, d, 1)           # g(x_j): queries
        self.h = nn.Conv2d(channels, channels, 1)    # h(x_i): values
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):                            # x: (B, C, H, W)
        B, C, H, W = x.shape
        # SAGAN: s_ij = f(x_i)^T g(x_j), beta_ji = softmax over i, o_j = sum_i beta_ji h(x_i);
        # output position j is the op's query, summed position i its key.
        q = self.g(x).flatten(2)                     # (B, C/8, N), N = H*W
        k = self.f(x).flatten(2)                     # (B, C/8, N)
        v = self.h(x).flatten(2)                     # (B, C, N)
        o = backends.attention(q.contiguous(), k.contiguous(), v.contiguous())   # the op, UNIT_ATTN's implementation
        return self.gamma * o.view(B, C, H, W) + x

    def weights(self, x, queries):
        """beta for a few output positions only: (B, Q, H*W) float32, row j the softmax weights with
        which output position queries[j] (a flat index r * W + c of this block's H x W grid) sums
        the values h(x_i) of all positions i. x: this block's input (B, C, H, W). Holds Q x N,
        never the N x N matrix of all queries (N = 19456 in the poster's generator)."""
        q = self.g(x).flatten(2)[:, :, list(queries)]   # (B, C/8, Q)
        k = self.f(x).flatten(2)                         # (B, C/8, N)
        return torch.softmax(torch.bmm(q.transpose(1, 2), k).float(), dim=-1)


@contextmanager
def attention_weights(model, points, size):
    """While inside, every SelfAttention of `model` that runs records where the given points attend:

        with attention_weights(model, [(r, c), ...], (H, W)) as maps:
            model.translate(x, "a")
        maps: [{"layer": "enc_a.net.9", "gamma": float, "grid": (h, w), "queries": [(r_l, c_l), ...],
                "beta": (B, Q, h, w) float32 tensor on the CPU}, ...] in the order the layers ran.

    "layer" is the block's name in model.named_modules(); unit.model.place_of names its place from the first
    part (enc_a -> "encoder T1w"). A translation runs the source encoder's and the target generator's
    blocks; a discriminator's run only when the discriminator does (evaluate.py --attention-maps runs it).

    points are (row, col) pixels of the (H, W) input image; each is mapped to the cell of the
    layer's own h x w grid that covers it (r_l = r * h // H), the query whose weights are recorded.
    A forward hook per SelfAttention computes them with SelfAttention.weights from the block's input."""
    maps, handles = [], []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            h, w = x.shape[2:]
            cells = [(r * h // size[0], c * w // size[1]) for r, c in points]
            beta = module.weights(x, [r * w + c for r, c in cells])
            maps.append({"layer": name, "gamma": module.gamma.item(), "grid": (h, w), "queries": cells,
                         "beta": beta.view(x.shape[0], len(cells), h, w).cpu()})
        return record

    for name, m in model.named_modules():
        if isinstance(m, SelfAttention):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()

