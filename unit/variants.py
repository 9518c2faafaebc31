"""A run's variant, named in one place: its run-folder name (train.py's default --out, the studies' run folders)
and its label in tables (evaluate.py), both read from the config.

    name({"attn": "encoder", "sn": True, "charbonnier": True, ...})  -> "encoder-sn-cl"
    label(the same)                                                   -> "attention in encoder +SN +CL"

A setting that changes what is trained (the model or the objective) gets a line in PARTS: then a run with it
gets a folder of its own, and the poster study (experiments/poster.py) never takes another variant's finished
runs for its own. Hyperparameters of one variant (lr, width, epochs, ...) are not part of the name; the studies
compare a run folder's checkpoint config with the one they plan before they reuse it.
"""

# (config key, its default: left out of the name, the word in the run-folder name, the word in the label);
# None = the value itself, e.g. --gan-loss lsgan -> "lsgan" / "lsgan loss"; "{}" in a word: the value there
PARTS = [
    ("sn", False, "sn", "+SN"),
    ("charbonnier", False, "cl", "+CL"),
    ("channels", 1, "rgb", "RGB"),
    ("upsample", "deconv", "resize", "resize-upsampling"),
    ("gan_loss", "bce", None, None),
    ("down", 2, "down{}", "latent at H/2"),
    ("d_patch", False, "dpatch", "+patch D"),
    ("d_scales", 1, "dscales{}", "+{}-scale D"),
    ("w_struct", 0.0, "struct{}", "+structure x{}"),
    ("w_paired", 0.0, "paired{}", "+paired L1 x{} (supervised)"),
    ("context", 0, "ctx{}", "+{} neighbouring slices a side (2.5D)"),
]


def _changed(cfg):
    """(value, word, words) of each PARTS setting that differs from its default, in PARTS order, with the value
    written into a word that has "{}" (floats as %g: paired100)."""
    put = lambda w, v: w.replace("{}", f"{v:g}" if isinstance(v, float) else str(v)) if w else w
    return [(cfg[key], put(word, cfg[key]), put(words, cfg[key])) for key, default, word, words in PARTS
            if cfg[key] != default]


def name(cfg):
    """The run-folder name: the attention placement, then a word for each setting that differs from the default."""
    return "-".join([cfg["attn"]] + [word or str(v) for v, word, _ in _changed(cfg)])


def label(cfg):
    """The variant in the poster's words, for tables."""
    head = "baseline" if cfg["attn"] == "none" else f"attention in {cfg['attn']}"
    return " ".join([head] + [words or f"{v} loss" for v, _, words in _changed(cfg)])
