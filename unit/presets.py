"""The CPU presets of train.py, and why.

Without CUDA the poster's configuration is far too slow (2 cores: ~4 s per iteration already at
128x112 with width 16, and the poster's width 64 at 304x256 is ~100x more work), so a CPU run picks a
reduced preset for every field not given on the command line, prints it, and --full turns it off. There
are two, as the data asks for different things (measured on 2 cores; docs/realmri.md):
- the built-in phantom: 1.3-2.7 it/s (the machine varies), 6 epochs of 225 iterations in 9-18 min;
- real scans (--data prepared from NIfTI, e.g. BraTS at 2 mm, 112x96): resize upsampling (no checkerboard),
  batch 2 and a learning rate of 6e-4 for G and 4x that for D (the discriminators barely learned at the
  phantom's settings), both rates falling linearly to 0 over the second half (CycleGAN's schedule: the last
  checkpoint varied less between seeds), a latent at H/2 (--down 1: translations keep more detail, at 2.3x
  the time of a step), the structure term (--w-struct 30: translations keep their input's edges), 1800 steps
  (~25 min at ~1.25 it/s, its evaluation included), and a time guard that ends a slower machine's run at
  28 minutes, so a run takes at most ~30. Chosen on the benchmark's validation patients (issue 24; docs/realmri.md).
"""
import json
import os

# the built-in phantom
CPU_PRESET = dict(size="96x80", width=8, batch_size=4, epochs=6, save_epochs="2,4,6", eval_every=2, save_minutes=10.0)
# real scans (a dataset prepared from NIfTI)
CPU_PRESET_SCANS = dict(width=8, batch_size=2, lr=6e-4, lr_d=2.4e-3, lr_decay=0.5, upsample="resize", down=1,
                        w_struct=30.0, max_steps=1800, max_minutes=28.0, eval_every=1, save_minutes=10.0)


# measured on the benchmark's validation patients (docs/realmri.md): every run of the scans preset with spectral norm
# kept the input's contrast or barely learned, with the structure term or without it
SN_ON_SCANS = ("warning: --sn did not learn with this preset in 4 of 4 runs on the real-data benchmark's validation "
               "patients (brain SSIM -0.10 to 0.20, against 0.72 / 0.68 without it; docs/realmri.md): its learning rates "
               "and budget were chosen without spectral norm")


def data_meta(path):
    """meta.json of a prepared dataset ({"source": "brats", "paired": true, ...}), or {} when it cannot be read
    (loading the data later says why)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_preset(data):
    """The preset of a CPU run on the prepared dataset `data` ("" = the built-in phantom): (CPU_PRESET_SCANS or
    CPU_PRESET, what it is for, in words)."""
    scans = bool(data) and data_meta(data).get("source") not in (None, "phantom")
    return (CPU_PRESET_SCANS, "real scans") if scans else (CPU_PRESET, "the phantom")
