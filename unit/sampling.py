"""What each training step sees, as a function of (seed, step) alone, so that a resumed run, or one split over
torchrun processes, draws exactly what an uninterrupted single process would: the batch order of every epoch
(batch_indices, Batches) and the latent noise of every draw (latent_noise)."""
import numpy as np
import torch

from unit import UserError
from unit.evaluation import context_rows, take, to_model


def batch_indices(n, steps, batch_size, seed, epoch, domain):
    """(steps, batch_size) indices into one domain's n training slices for an epoch: a fixed
    function of (seed, epoch, domain), so a resumed run sees exactly the batches it would have
    seen. Domains are shuffled independently: UNIT never sees a pair."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + (domain == "b"))
    perm = torch.randperm(n, generator=g)[: steps * batch_size]
    return perm.view(steps, batch_size).sort(dim=1).values.numpy()  # sorted rows: kinder to the memmap


def train_slices(data, min_brain, q):
    """Indices of the training slices of contrast q ('t1', 't2') a run draws from: all of them, or with
    min_brain > 0 those whose brain mask covers at least that fraction of the slice (the edge slices of a
    volume hold a few pixels of brain: steps spent on them teach little)."""
    n = len(data.train_t1 if q == "t1" else data.train_t2)
    if not min_brain:
        return np.arange(n)
    if data.train_mask is None or not data.paired:
        raise UserError(f"--min-brain {min_brain} needs the brain masks of paired data, and {data.path} has "
                        f"{'no masks' if data.train_mask is None else 'unpaired slices'}; pass --min-brain 0")
    area = np.concatenate([np.asarray(data.train_mask[i:i + 512]).reshape(-1, data.shape[0] * data.shape[1]).mean(1)
                           for i in range(0, n, 512)])
    return np.flatnonzero(area >= min_brain)


def latent_noise(gen, seed, step, draw, shape, rank):
    """N(0, I) noise shaped like this rank's latent codes `shape` = (B, C, h, w), for draw `draw` of
    step `step`. Sample j of the global batch has a stream of its own, seeded by (seed, step, draw,
    j): one process with batch 2b and two with batch b draw the same numbers, and a resumed run
    draws what it would have drawn. gen: a torch.Generator on the device (no host sync)."""
    B = shape[0]
    z = []
    for j in range(rank * B, (rank + 1) * B):
        gen.manual_seed((((seed * 1_000_003 + step) * 8 + draw) * 1_000_003 + j) % 2 ** 63)
        z.append(torch.randn(shape[1:], generator=gen, device=gen.device))
    return torch.stack(z)


class Batches:
    """This rank's share of every step's batch. A step's global batch is --batch-size x world slices per domain,
    drawn by batch_indices() from the training slices a run uses (train_slices); rank r takes its r-th share.
    With --w-paired domain b takes domain a's batch, so the two are pairs. With --context k each slice comes with
    its k neighbours on either side as channels (evaluation.context_rows). batches(step) -> (x_a, x_b), each
    (B, ch, H, W) in [-1, 1], copied to the device without waiting (pinned memory on CUDA)."""

    def __init__(self, data, cfg, device, rank=0, world=1):
        self.data, self.device, self.rank = data, device, rank
        self.ch, self.bs, self.gbs = cfg["channels"], cfg["batch_size"], cfg["batch_size"] * world
        self.seed, self.paired = cfg["seed"], bool(cfg["w_paired"])
        self.pool = {"a": train_slices(data, cfg["min_brain"], "t1"), "b": train_slices(data, cfg["min_brain"], "t2")}
        self.n_train = min(len(self.pool["a"]), len(self.pool["b"]))   # differ only in unpaired PNG datasets
        if self.n_train < self.gbs:
            raise UserError(f"{cfg['data']} has {self.n_train} training slices, fewer than the global batch {self.gbs} "
                            f"(--batch-size {self.bs} x {world} processes)")
        self.steps_per_epoch = self.n_train // self.gbs
        self.orders = {}
        # --context: the rows of each slice's stack of neighbours (both domains: the same volumes, the same rows)
        self.rows = context_rows(data, "train", cfg["context"]) if cfg["context"] else None

    def __call__(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self.orders:
            share = slice(self.rank * self.bs, (self.rank + 1) * self.bs)   # this rank's columns of the global batch
            rows = {d: batch_indices(len(self.pool[d]), self.steps_per_epoch, self.gbs, self.seed, epoch, d)[:, share]
                    for d in ("a", "b")}
            self.orders = {epoch: [self.pool[d][rows[d]] for d in ("a", "b")]}   # pools are sorted
        ia, ib = self.orders[epoch][0][i], self.orders[epoch][1][i]
        if self.paired:
            ib = ia
        return (to_model(take(self.data.train_t1, ia, self.rows), self.ch, self.device, non_blocking=True),
                to_model(take(self.data.train_t2, ib, self.rows), self.ch, self.device, non_blocking=True))
