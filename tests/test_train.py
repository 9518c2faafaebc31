"""train.py / evaluate.py end to end on a tiny phantom: CLI smoke, checkpoints, exact resume,
and the one-sentence errors for bad input."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train
from unit import checkpoint, presets, sampling
from unit.data import prepare_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--full", "--width", "4", "--batch-size", "2", "--device", "cpu", "--eval-limit", "4"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "phantom")
    prepare_phantom(path, n_train=6, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)
    return path


def run(script, *args, env=None):
    """Run a top-level script as a user would; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "UNIT_ATTN": "naive", **(env or {})})


def weights(path):
    return torch.load(path, weights_only=True)["model"]


# For the tests that compare two processes' weights bit for bit: one thread each. With several, a library's
# reductions may add in another order from one process to the next on some CPUs (CI once saw it in
# test_resume_is_exact), and in training a 1-ulp difference in one bias grows to 3e-4 in the weights within
# 2 steps (Adam's steps on near-zero gradients), as large as a lost Adam state: no tolerance separates them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def straight_and_resumed(flags, tmp_path, steps, first):
    """`steps` steps in one run (tmp_path/straight), and `first` steps then --resume to `steps` (tmp_path/resumed),
    each process with one thread (ONE_THREAD). Returns (the straight run's CompletedProcess, its folder, the
    resumed run's folder)."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    r = run("train.py", *flags, "--out", str(a), "--max-steps", str(steps), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert run("train.py", *flags, "--out", str(b), "--max-steps", str(first), env=ONE_THREAD).returncode == 0
    resumed = run("train.py", "--resume", str(b / "ckpt.pt"), "--max-steps", str(steps), env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    return r, a, b


def test_cli_train_then_evaluate(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--data", tiny_data, "--out", str(out), "--epochs", "2", "--save-epochs", "1,2", "--log-every",
            "1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "config" in r.stdout
    # the phantom has brain masks, so each evaluation line leads with the brain-masked SSIM
    assert re.search(r"epoch 2 step \d+: brain SSIM T1 [-\d.]+ T2 [-\d.]+ \(identity [-\d.]+\), whole-slice SSIM T1 "
                     r"[-\d.]+ T2 [-\d.]+ \(identity [-\d.]+\), 3 test slices", r.stdout), r.stdout
    for f in ("ckpt.pt", "ckpt_e001.pt", "ckpt_e002.pt", "metrics.jsonl", "config.json", "samples_e002.png"):
        assert (out / f).exists(), f
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["epoch"] for m in lines if m["kind"] == "eval"] == [1, 2]
    assert all(-1 <= m["identity_ssim_mask"] <= 1 for m in lines if m["kind"] == "eval")
    cfg = json.load(open(out / "config.json"))                        # every term of G's loss is logged
    steps = [m for m in lines if m["kind"] == "train"]
    assert len(steps) == 6 and all(m["G"] == pytest.approx(sum(cfg["w_" + k] * m[k] for k in
                                   ("gan", "kl", "rec", "kl_cyc", "cyc")), rel=1e-5) for m in steps)
    r = run("evaluate.py", str(out / "ckpt.pt"), "--json", str(tmp_path / "res.json"),
            "--save-images", str(tmp_path / "img"))
    assert r.returncode == 0, r.stderr
    assert "identity" in r.stdout and "SSIM T1" in r.stdout
    res = json.load(open(tmp_path / "res.json"))
    assert res["n"] == 3 and 0 <= res["T1"]["ssim"] <= 1 and "ssim_mask" in res["T2"]
    assert len(os.listdir(tmp_path / "img")) == 3


def test_checkpoint_round_trip(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--data", tiny_data, "--out", str(out), "--max-steps", "1", *TINY).returncode == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["step"] == 1
    assert set(ckpt) >= {"model", "opt_g", "opt_d", "config", "epoch", "rng"}
    assert ckpt["opt_g"]["state"] and ckpt["opt_d"]["state"]          # Adam moments are saved
    assert ckpt["finished"] is True and 0 < ckpt["seconds"] < 600       # its last step; training time
    cfg = ckpt["config"]
    assert json.loads(json.dumps(cfg)) == cfg                          # plain types only
    model = checkpoint.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_resume_is_exact(tiny_data, tmp_path):
    """2 steps + resume + 2 steps == 4 steps, bit for bit, on the CPU (with SN and attention)."""
    flags = ["--data", tiny_data, "--sn", "--attn", "encoder", *TINY, "--eval-every", "0"]
    _, a, b = straight_and_resumed(flags, tmp_path, 4, 2)
    wa, wb = weights(a / "ckpt.pt"), weights(b / "ckpt.pt")
    assert torch.load(b / "ckpt.pt", weights_only=True)["step"] == 4
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigterm_saves_a_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", tiny_data, "--out", str(out),
                          "--epochs", "1000", "--eval-every", "0", *TINY], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "UNIT_ATTN": "naive"})
    for line in p.stdout:                         # wait until training has started
        if line.startswith("model:"):
            break
    import time
    time.sleep(2)
    p.terminate()
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted (SIGTERM)" in stdout
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] >= 1 and ck["finished"] is False and ck["seconds"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--attn", "encoder", "--size", "100x98"], "multiples of 4"),
    (["--data", "DATA", "--size", "64x64"], "cannot be combined"),
    (["--batch-size", "0"], "at least 1"),
    (["--data", "DATA", "--d-scales", "2"], "above 64 with --d-scales 2"),
    (["--device", "gpu"], "not cpu, cuda"),
    (["--data", "DATA", "--out", "/proc/forbidden"], "cannot write"),
])
def test_train_bad_input_is_one_sentence(tiny_data, tmp_path, args, needle):
    args = [tiny_data if a == "DATA" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    r = run("train.py", *TINY, *args)            # later flags win: the bad value is the one used
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_train_data_folder_without_prepared_files(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("train.py", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(tmp_path / "empty") in r.stderr


def test_resume_with_contradicting_flag(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--data", tiny_data, "--out", str(out), "--max-steps", "1", *TINY).returncode == 0
    r = run("train.py", "--resume", str(out / "ckpt.pt"), "--attn", "both")
    assert r.returncode == 2 and "contradicts" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_rejects_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for name, needle in (("other.pt", "not a checkpoint written by"), ("junk.pt", "not a readable checkpoint"),
                         ("missing.pt", "does not exist")):
        r = run("evaluate.py", str(tmp_path / name))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluate_refuses_unpaired_data_with_the_reason(tiny_data, tmp_path):
    import numpy as np
    from unit.data import write_prepared
    out = tmp_path / "run"
    assert run("train.py", "--data", tiny_data, "--out", str(out), "--max-steps", "1", *TINY).returncode == 0
    z = np.zeros((2, 64, 64), np.float16)
    write_prepared(str(tmp_path / "ixi"), z, z, z, z, {"source": "ixi", "layout": "ixi", "paired": False, "seed": 0})
    r = run("evaluate.py", str(out / "ckpt.pt"), "--data", str(tmp_path / "ixi"))
    assert r.returncode == 2 and "not paired" in r.stderr and "co-registered" in r.stderr, r.stderr


def test_config_precedence_flags_over_cpu_preset_over_defaults():
    cfg, _, note = train.resolve_config({"width": 16}, full=False, resume=None)
    assert cfg["width"] == 16 and cfg["batch_size"] == presets.CPU_PRESET["batch_size"] and cfg["device"] == "cpu"
    assert "size=96x80" in note and "width" not in note        # the note lists what the preset set
    # with --data the prepared slices decide the size, so the note does not claim the preset's
    _, _, note = train.resolve_config({"data": "d"}, full=False, resume=None)
    assert "size=96x80" not in note and "batch_size=4" in note
    cfg, _, note = train.resolve_config({}, full=True, resume=None)
    assert cfg["width"] == train.Config().width and note == "poster settings"


def test_real_scans_get_their_own_cpu_preset(tiny_data, tmp_path):
    """--data prepared from NIfTI (meta.json source: not the phantom) picks CPU_PRESET_SCANS, flags still win."""
    import numpy as np
    from unit.data import write_prepared
    z = np.zeros((4, 64, 64), np.float16)
    scans = write_prepared(str(tmp_path / "brats"), z, z, z, z, {"source": "brats", "layout": "brats", "seed": 0})
    cfg, _, note = train.resolve_config({"data": scans, "lr": 1e-3}, full=False, resume=None)
    assert {k: cfg[k] for k in presets.CPU_PRESET_SCANS if k != "lr"} == \
        {k: v for k, v in presets.CPU_PRESET_SCANS.items() if k != "lr"} and cfg["lr"] == 1e-3
    assert "preset for real scans" in note and "lr=" not in note.replace("lr_d=", "") and "--sn" not in note
    assert presets.SN_ON_SCANS in train.resolve_config({"data": scans, "sn": True}, full=False, resume=None)[2]
    cfg, _, note = train.resolve_config({"data": tiny_data}, full=False, resume=None)   # the phantom's
    assert cfg["batch_size"] == presets.CPU_PRESET["batch_size"] and "preset for the phantom" in note


def test_batch_order_is_a_function_of_seed_epoch_domain():
    import numpy as np
    a = sampling.batch_indices(10, 4, 2, seed=0, epoch=3, domain="a")
    assert a.shape == (4, 2) and len(set(a.ravel())) == 8 and a.max() < 10      # no slice twice per epoch
    assert np.array_equal(a, sampling.batch_indices(10, 4, 2, seed=0, epoch=3, domain="a"))
    assert not np.array_equal(a, sampling.batch_indices(10, 4, 2, seed=0, epoch=3, domain="b"))
    assert not np.array_equal(a, sampling.batch_indices(10, 4, 2, seed=0, epoch=4, domain="a"))
    b = sampling.batch_indices(25, 4, 2, seed=0, epoch=0, domain="b")              # unpaired: more B slices
    assert b.max() < 25 and len(set(b.ravel())) == 8


def test_amp_bf16_trains_like_fp32(tiny_data, tmp_path):
    """--amp bf16 (autocast on the CPU here, with spectral norm and attention in the encoders and the
    discriminators): finite losses, the same learning curve as fp32 (the reconstruction loss goes from ~1.5
    at step 10 to ~0.95 at step 40; bf16 stays within 2% of fp32 at every logged step: measured 0.17% at
    most) and the same SSIM within 0.02 (both still near the identity's after so few steps: the learning
    curve is the sharper check)."""
    runs = {}
    for amp in ("fp32", "bf16"):
        out = tmp_path / amp
        r = run("train.py", "--data", tiny_data, "--out", str(out), *TINY, "--sn", "--attn", "encoder+discriminator",
                "--amp", amp, "--max-steps", "40", "--epochs", "100", "--eval-every", "100", "--log-every", "10",
                env={"UNIT_ATTN": "auto"})
        assert r.returncode == 0, r.stderr
        runs[amp] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    curves = {amp: [m for m in lines if m["kind"] == "train"] for amp, lines in runs.items()}
    assert [m["step"] for m in curves["bf16"]] == [10, 20, 30, 40]
    assert all(math.isfinite(m[k]) for m in curves["bf16"] for k in train.LOSS_NAMES)
    for k in ("rec", "cyc"):
        fp32, bf16 = [m[k] for m in curves["fp32"]], [m[k] for m in curves["bf16"]]
        assert fp32[-1] < 0.8 * fp32[0]                                      # it learns
        assert all(abs(b / f - 1) < 0.02 for f, b in zip(fp32, bf16)), (k, fp32, bf16)
    ssim = {amp: [m for m in lines if m["kind"] == "eval"][-1] for amp, lines in runs.items()}
    for c in ("T1", "T2"):
        assert abs(ssim["bf16"][f"ssim_{c}"] - ssim["fp32"][f"ssim_{c}"]) < 0.02, ssim


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available to torch")
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_cuda_step_never_waits_for_the_gpu(amp):
    """train.py's step, the latent noise and the next batch's copy, with torch's sync debug mode set to
    raise on any host-device synchronisation (after one warm-up step: the attention op's self-check
    and the dispatch's first choice do synchronise, once)."""
    import numpy as np
    from unit.evaluation import to_model
    from unit.model import UNIT
    cfg = {**train.Config().__dict__, "attn": "encoder+generator+discriminator", "sn": True, "amp": amp}
    torch.manual_seed(0)
    model = UNIT(width=4, attn=cfg["attn"], sn=True).cuda()
    opt_g, opt_d = train.make_optimizers(model, cfg)
    gen = torch.Generator(device="cuda")
    images = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    x = to_model(images[:2], 1, "cuda", non_blocking=True)
    shape = model.code_shape(x)

    def step(i):
        x_a, x_b = to_model(images[:2], 1, "cuda", non_blocking=True), to_model(images[2:], 1, "cuda", non_blocking=True)
        noise = lambda k: sampling.latent_noise(gen, 0, i, k, shape, 0)
        return train.train_step(model, model.generator_side(), model.discriminator_side(), opt_g, opt_d, x_a, x_b,
                                noise, cfg)

    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(i) for i in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


def test_version_1_checkpoints_from_before_later_settings_still_evaluate_and_resume(tiny_data, tmp_path):
    """A version-1 file as the first train.py wrote it has none of the config keys added since (--upsample, --amp,
    torchrun, --gan-loss, --lr-d, ...): checkpoint.load fills each with what those runs did (ADDED_KEYS), so
    evaluate.py reads it and --resume continues it; every Config field is either in the first files or there."""
    first = {"data", "size", "out", "attn", "sn", "charbonnier", "charbonnier_eps", "channels", "width", "w_gan",
             "w_kl", "w_rec", "w_kl_cyc", "w_cyc", "lr", "beta1", "beta2", "batch_size", "epochs", "max_steps",
             "seed", "save_epochs", "eval_every", "eval_limit", "log_every", "device"}    # Config of 4fd8788
    assert set(dataclasses.asdict(train.Config())) | {"world_size", "prep"} == first | set(checkpoint.ADDED_KEYS)
    out = tmp_path / "run"
    assert run("train.py", "--data", tiny_data, "--out", str(out), "--max-steps", "1", *TINY).returncode == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k in first}
    torch.save(ckpt, out / "old.pt")
    r = run("evaluate.py", str(out / "old.pt"))
    assert r.returncode == 0 and "SSIM T1" in r.stdout, r.stderr
    r = run("train.py", "--resume", str(out / "old.pt"), "--max-steps", "2", "--out", str(tmp_path / "resumed"))
    assert r.returncode == 0, r.stderr
    cfg = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["config"]
    assert {k: cfg[k] for k in checkpoint.ADDED_KEYS} == checkpoint.ADDED_KEYS


def test_brain_slices_resume_exactly(tmp_path):
    """--min-brain trains on the slices with that much brain; the pool is a fixed function of the data, and the
    batch order of (seed, epoch, domain), so 2 steps straight equal 1 step + resume + 1 step, bit for bit."""
    import numpy as np
    from unit.data import load_prepared
    data = str(tmp_path / "d")
    prepare_phantom(data, n_train=8, n_test=1, slices=3, size=(64, 64), seed=1, progress=False)
    d = load_prepared(data)
    area = np.asarray(d.train_mask).reshape(len(d.train_mask), -1).mean(1)
    t = float(np.sort(area)[len(area) // 2])                          # half of the slices have at least this much
    assert np.array_equal(sampling.train_slices(d, t, "t1"), np.flatnonzero(area >= t))
    assert np.array_equal(sampling.train_slices(d, 0, "t2"), np.arange(len(area)))
    flags = ["--data", data, "--min-brain", str(t), *TINY, "--eval-every", "0"]
    r, a, b = straight_and_resumed(flags, tmp_path, 2, 1)
    assert f"{int((area >= t).sum())} training slices" in r.stdout
    wa, wb = weights(a / "ckpt.pt"), weights(b / "ckpt.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    r = run("train.py", "--data", tiny_data_of(tmp_path), "--out", str(tmp_path / "x"), "--min-brain", "0.1", *TINY)
    assert r.returncode == 2 and "needs the brain masks" in r.stderr


def tiny_data_of(tmp_path):
    """A 64x64 prepared dataset without masks (unpaired PNG-like)."""
    import numpy as np
    from unit.data import write_prepared
    z = np.zeros((4, 64, 64), np.float16)
    return write_prepared(str(tmp_path / "nomask"), z, z, z, z, {"source": "png", "layout": "folders", "seed": 0})


def test_max_minutes_ends_the_run_when_the_time_is_up(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--data", tiny_data, "--out", str(out), "--epochs", "50", "--max-minutes", "0.0001", *TINY)
    assert r.returncode == 0, r.stderr
    assert "--max-minutes 0.0001: the time is up at step 1 of 150; ending the run here" in r.stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1 and ck["finished"] is True and ck["saved_by"] == "end of run"   # saved as the end ...
    evals = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [1]                                            # ... then evaluated


def test_learning_rate_decay_follows_the_step_and_resumes_exactly(tiny_data, tmp_path):
    """--lr-decay F: constant, then a linear fall towards 0 over the last F of the run (CycleGAN's schedule), a
    function of the step; with it 2 steps + resume + 2 steps still equal 4 steps, bit for bit."""
    assert [train.lr_factor(s, 8, 0.5) for s in range(8)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert all(train.lr_factor(s, 8, 0) == 1 for s in range(8))
    flags = ["--data", tiny_data, *TINY, "--eval-every", "0", "--lr-decay", "0.5"]
    _, a, b = straight_and_resumed(flags, tmp_path, 4, 2)
    wa, wb = weights(a / "ckpt.pt"), weights(b / "ckpt.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ck = torch.load(a / "ckpt.pt", weights_only=True)                 # step 3 of 4 ran at half the rates
    assert ck["opt_g"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.5)


def test_discriminator_learning_rate():
    cfg, _, _ = train.resolve_config({"lr": 3e-4, "lr_d": 1.2e-3, "width": 4}, full=True, resume=None)
    model = checkpoint.build_model(cfg)
    opt_g, opt_d = train.make_optimizers(model, cfg)
    assert opt_g.param_groups[0]["lr"] == 3e-4 and opt_d.param_groups[0]["lr"] == 1.2e-3
    cfg["lr_d"] = 0                                                      # 0: the discriminators take --lr
    assert train.make_optimizers(model, cfg)[1].param_groups[0]["lr"] == 3e-4


def test_a_validation_split_is_where_training_evaluates(tiny_data, tmp_path):
    """With a validation split the per-epoch evaluation and sample grids use it, never the test split, and
    evaluate.py --split val scores it; --split val of a dataset without one is one sentence."""
    from unit.data import PreparedWriter, load_prepared
    d = load_prepared(tiny_data)
    data = str(tmp_path / "with-val")
    with PreparedWriter(data, (64, 64), masks=True) as w:
        for split, idx in (("train", range(4)), ("val", range(4, 6)), ("test", range(3))):
            src = d.test_t1 if split == "test" else d.train_t1
            src2, m = (d.test_t2, d.test_mask) if split == "test" else (d.train_t2, d.train_mask)
            for i in idx:
                w.add(split, f"{split}{i}", src[i], src2[i], m[i])
        w.finish({"source": "phantom", "layout": "phantom", "seed": 0, "mask": d.meta["mask"]})
    out = tmp_path / "run"
    r = run("train.py", "--data", data, "--out", str(out), "--max-steps", "2", "--log-every", "1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "has a validation split: the per-epoch evaluation and the sample grids use its 2 slices" in r.stdout
    assert "epoch 1 step 2: brain SSIM" in r.stdout and "2 val slices" in r.stdout
    ev = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == "eval"]
    assert [(m["split"], m["n"]) for m in ev] == [("val", 2)]
    r = run("evaluate.py", str(out / "ckpt.pt"), "--split", "val", "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0 and "val split of" in r.stdout and "2 slices" in r.stdout, r.stderr
    assert json.load(open(tmp_path / "v.json"))["n"] == 2
    assert ev[0]["ssim_mask_T1"] == pytest.approx(json.load(open(tmp_path / "v.json"))["T1"]["ssim_mask"], abs=1e-6)
    r = run("evaluate.py", str(out / "ckpt.pt"), "--data", tiny_data, "--split", "val")
    assert r.returncode == 2 and "has no validation split" in r.stderr and "Traceback" not in r.stderr


def batches_seen(monkeypatch):
    """A list that gets (x_a, x_b) of every train_step() from now on."""
    seen, real = [], train.train_step
    def spy(model, g, d, og, od, x_a, x_b, noise, cfg):
        seen.append((x_a.clone(), x_b.clone()))
        return real(model, g, d, og, od, x_a, x_b, noise, cfg)
    monkeypatch.setattr(train, "train_step", spy)
    return seen


def test_a_finer_latent_and_the_paired_term(tiny_data, tmp_path, monkeypatch):
    """--down 1: a latent at H/2 x W/2; --w-paired W: the batches are pairs (slice i of T1w with slice i of T2w),
    the term is logged and part of G, and the run has a variant name of its own; unpaired data is refused before
    the run folder is made."""
    from unit import variants
    from unit.data import load_prepared
    from unit.model import UNIT
    m = UNIT(width=4, down=1)
    x = torch.zeros(2, 1, 64, 64)
    assert m.code_shape(x) == tuple(m.encode(x, "a").shape) == (2, 32, 32, 32) and m.translate(x, "a").shape == x.shape
    seen = batches_seen(monkeypatch)
    out = tmp_path / "run"
    assert train.main(["--data", tiny_data, "--out", str(out), "--max-steps", "3", "--log-every", "1", "--down", "1",
                       "--w-paired", "100", *TINY, "--eval-every", "0"]) == 0
    import numpy as np
    d = load_prepared(tiny_data)
    t1, t2 = (np.asarray(a, np.float32) * 2 - 1 for a in (d.train_t1, d.train_t2))
    assert len(seen) == 3
    for x_a, x_b in seen:                                 # each T2w image is the pair of the T1w image beside it
        for a, b in zip(x_a[:, 0].numpy(), x_b[:, 0].numpy()):
            i = int(np.argmin([np.abs(a - s).max() for s in t1]))
            assert np.abs(a - t1[i]).max() < 1e-6 and np.abs(b - t2[i]).max() < 1e-6
    cfg = json.load(open(out / "config.json"))
    assert (cfg["down"], cfg["w_paired"], variants.name(cfg)) == (1, 100.0, "none-down1-paired100")
    steps = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == "train"]
    assert all(m["paired"] > 0 and m["G"] == pytest.approx(sum(cfg["w_" + k] * m[k] for k in
               ("gan", "kl", "rec", "kl_cyc", "cyc", "paired")), rel=1e-5) for m in steps)
    from unit.data import write_prepared
    z = np.zeros((4, 64, 64), np.float16)
    unpaired = write_prepared(str(tmp_path / "unpaired"), z, z[:3], z, z[:3], {"source": "png", "layout": "folders",
                                                                              "seed": 0, "paired": False})
    r = run("train.py", "--data", unpaired, "--out", str(tmp_path / "refused"), "--w-paired", "1", *TINY)
    assert r.returncode == 2 and "is not paired" in r.stderr and not (tmp_path / "refused").exists()


def test_context_feeds_each_slice_with_its_neighbours(tmp_path, monkeypatch):
    """--context 1 (2.5D): every training image is its slice with the slices above and below of the same volume as
    channels (the end slice repeats at a volume's ends; never a slice of another subject), T1w and T2w of the same
    rows; training, its evaluation and the run's name work on such stacks; data without volumes is refused before
    the run folder is made."""
    import numpy as np
    from unit import variants
    from unit.data import write_prepared
    r = np.random.default_rng(0)
    z = {"p": range(5), "q": range(10, 14), "t": range(3, 7)}          # two training volumes, one test volume
    ids = {"train": ["p"] * 5 + ["q"] * 4, "test": ["t"] * 4}
    t1, t2 = (r.random((9, 64, 64)).astype(np.float32) for _ in range(2))
    e1, e2 = (r.random((4, 64, 64)).astype(np.float32) for _ in range(2))
    meta = {"source": "brats", "slice_subject": ids, "volumes": {s: {"slices": list(v)} for s, v in z.items()}}
    data = write_prepared(str(tmp_path / "vols"), t1, t2, e1, e2, meta)
    seen = batches_seen(monkeypatch)
    out = tmp_path / "run"
    assert train.main(["--data", data, "--out", str(out), "--max-steps", "4", "--context", "1", "--w-struct", "1",
                       *TINY]) == 0
    h1, h2 = (np.asarray(a, np.float16).astype(np.float32) * 2 - 1 for a in (t1, t2))   # as stored, as the model sees
    which = lambda img, stack: int(np.argmin([np.abs(img - s).max() for s in stack]))
    first = {"p": 0, "q": 5}
    for x_a, x_b in seen:
        assert x_a.shape == x_b.shape == (2, 3, 64, 64)
        for sa, sb in zip(x_a.numpy(), x_b.numpy()):
            for s, h in ((sa, h1), (sb, h2)):
                i = which(s[1], h)
                lo, hi = first[ids["train"][i]], first[ids["train"][i]] + len(z[ids["train"][i]]) - 1
                assert [which(c, h) for c in s] == [max(i - 1, lo), i, min(i + 1, hi)]
                assert max(np.abs(c - h[j]).max() for c, j in zip(s, [max(i - 1, lo), i, min(i + 1, hi)])) < 1e-6
    cfg = json.load(open(out / "config.json"))
    assert cfg["context"] == 1 and variants.name(cfg) == "none-struct1-ctx1"
    assert checkpoint.load(str(out / "ckpt.pt"))["model"]["enc_a.net.0.weight"].shape[1] == 3
    evals = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == "eval"]
    assert evals and math.isfinite(evals[-1]["ssim_T1"])
    r2 = run("train.py", "--data", data, "--out", str(tmp_path / "no"), "--context", "1", "--channels", "3", *TINY)
    assert r2.returncode == 2 and "--context" in r2.stderr and not (tmp_path / "no").exists()
