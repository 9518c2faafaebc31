"""Every writer fails cleanly (unit/io.py): under an injected ENOSPC (the disk fills mid-file) or EROFS (a
read-only file system) at the write layer (tests/faults.py), each says in one sentence which file, why and
the free space, removes its temp file and leaves the file there before intact (a checkpoint still loads);
evaluate.py and translate.py exit with status 1 and refuse to replace outputs unless --overwrite."""
import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import translate
from conftest import train_tiny
from faults import inject
from unit import UserError, checkpoint
from unit.data import load_prepared, prepare_phantom
from unit.figures import Sheet
from unit.io import Appender, WriteError, copy_file, write_nifti, write_png, write_text
from unit.model import UNIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRORS = {"ENOSPC": "No space left on device", "EROFS": "Read-only file system"}
_spec = importlib.util.spec_from_file_location("prepare_cli", os.path.join(ROOT, "data", "prepare.py"))
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)


def check_message(e, path, err, then):
    msg = str(e)
    assert msg.startswith(f"cannot write {path} ({ERRORS[err]}; ") and msg.endswith(f" free there); {then}"), msg
    assert "\n" not in msg


@pytest.mark.parametrize("err", list(ERRORS))
def test_checkpoint_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, err):
    model = UNIT(width=4)
    opt = torch.optim.Adam(model.parameters())
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, model, opt, opt, {"width": 4}, 1, 3, None)
    before = open(path, "rb").read()
    inject(monkeypatch, err, "ckpt.pt")
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with pytest.raises(WriteError) as e:
        checkpoint.save(path, model, opt, opt, {"width": 4}, 2, 6, None)
    check_message(e.value, path, err, "the file there before is unchanged")
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before
    assert checkpoint.load(path)["step"] == 3


def _csv(path):
    cfg = {**checkpoint.ADDED_KEYS, "attn": "none", "sn": False, "charbonnier": False, "channels": 1}
    res = {"T1": {"ssim": 0.5}, "T2": {"ssim": 0.6}}
    evaluate.write_csv(path, [{"ckpt": "a.pt", "config": cfg, "epoch": 1, "res": res}])


def _figure(path):
    sheet = Sheet(1, 1, (64, 64), label_w=118)
    sheet.put(0, 0, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "a caption")
    sheet.save(path)


NOISE = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
WRITERS = {   # file name: what writes it (as the scripts do); each writes more than tests/faults.py's ROOM
    "config.json": lambda p: write_text(p, json.dumps({f"key{i}": i for i in range(20)}, indent=2)),   # JSON
    "samples_e001.png": lambda p: write_png(p, Image.fromarray(NOISE)),                # sample grids, images
    "figure.png": _figure,                                                              # unit/figures.py
    "table.csv": _csv,                                                                  # evaluate.py --csv
    "x_t1_to_t2.nii.gz": lambda p: write_nifti(p, nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4))),
    "ckpt_e001.pt": lambda p: copy_file(os.path.join(os.path.dirname(p), "..", "src.bin"), p),   # kept checkpoints
}


@pytest.mark.parametrize("err", list(ERRORS))
@pytest.mark.parametrize("name", list(WRITERS))
def test_each_writer_fails_cleanly(tmp_path, monkeypatch, name, err):
    (tmp_path / "src.bin").write_bytes(os.urandom(5000))
    d = tmp_path / "out"
    d.mkdir()
    path = str(d / name)
    WRITERS[name](path)                                   # a good file first
    before = open(path, "rb").read()
    assert len(before) > 0
    inject(monkeypatch, err, name)
    with pytest.raises(WriteError) as e:
        WRITERS[name](path)
    check_message(e.value, path, err, "the file there before is unchanged")
    assert os.listdir(d) == [name] and open(path, "rb").read() == before
    os.remove(path)
    inject(monkeypatch, err, name)
    with pytest.raises(WriteError) as e:
        WRITERS[name](path)
    check_message(e.value, path, err, "nothing was written there")
    assert os.listdir(d) == []


@pytest.mark.parametrize("err", list(ERRORS))
def test_metrics_append_keeps_whole_lines(tmp_path, monkeypatch, err):
    path = tmp_path / "metrics.jsonl"
    log = Appender(path)
    log.write('{"kind": "train", "step": 1}\n')
    log.close()
    inject(monkeypatch, err, "metrics.jsonl")
    with pytest.raises(WriteError) as e:
        log = Appender(path)                              # EROFS: the open fails
        log.write(json.dumps({"kind": "train", "step": 2, "pad": "x" * 200}) + "\n")   # ENOSPC: after 16 bytes
    check_message(e.value, str(path), err, "its earlier lines are unchanged" if err == "ENOSPC" else
                  "nothing was written there")
    assert path.read_text() == '{"kind": "train", "step": 1}\n' and os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("err,name", [("ENOSPC", "train_t1.npy"), ("EROFS", "meta.json")])
def test_prepare_keeps_the_dataset_there_before(tmp_path, monkeypatch, capsys, err, name):
    out = tmp_path / "phantom"
    prepare_phantom(str(out), n_train=2, n_test=1, size=(64, 64), progress=False)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    inject(monkeypatch, err, name)
    args = ["phantom", "--out", str(out), "--n-train", "2", "--n-test", "1", "--size", "64x64", "--seed", "1",
            "--overwrite", "--quiet"]
    assert prepare.main(args) == 1
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and msg.startswith("error: ")
    check_message(msg[len("error: "):-1], out, err, "the partial output was removed and the dataset there before "
                                                    "is unchanged")
    assert os.listdir(tmp_path) == ["phantom"]             # no .phantom.partial-PID, no .phantom.old-PID
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert load_prepared(str(out)).meta["seed"] == 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    prepare_phantom(str(d / "data"), n_train=2, n_test=1, slices=1, size=(64, 64), progress=False)
    return train_tiny(d / "data", d / "run", 1)


def script(*args, fault=None):
    pre = [os.path.join(ROOT, "tests", "faults.py"), *map(str, fault)] if fault else []
    return subprocess.run([sys.executable, *pre, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UNIT_ATTN": "naive"})


def test_evaluate_and_translate_exit_1_on_a_failed_write(ckpt, tmp_path):
    r = script("evaluate.py", ckpt, "--json", str(tmp_path / "res.json"), fault=("ENOSPC", "res.json", 1))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    check_message(r.stderr[len("error: "):-1], str(tmp_path / "res.json"), "ENOSPC", "nothing was written there")
    vol = nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 6)).astype(np.float32) * 100, np.eye(4))
    vol.to_filename(tmp_path / "sub_T1w.nii.gz")
    out = str(tmp_path / "sub_T2w_synth.nii.gz")
    r = script("translate.py", ckpt, str(tmp_path / "sub_T1w.nii.gz"), out, fault=("EROFS", "sub_T2w_synth.nii.gz", 1))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1
    check_message(err[0][len("error: "):], out, "EROFS", "nothing was written there")
    assert sorted(os.listdir(tmp_path)) == ["sub_T1w.nii.gz"]


def test_evaluate_and_translate_refuse_to_replace_outputs(ckpt, tmp_path):
    (tmp_path / "res.json").write_text("{}")
    with pytest.raises(UserError, match=f"output {tmp_path}/res.json exists already; pass --overwrite"):
        evaluate.main([ckpt, "--json", str(tmp_path / "res.json"), "--device", "cpu"])
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "test_0000.png").write_bytes(b"x")
    with pytest.raises(UserError, match="test_0000.png exists already"):
        evaluate.main([ckpt, "--save-images", str(tmp_path / "img"), "--device", "cpu"])
    assert (tmp_path / "res.json").read_text() == "{}"
    Image.new("L", (64, 64), 100).save(tmp_path / "slice_t1.png")
    (tmp_path / "slice_t2.png").write_bytes(b"mine")
    with pytest.raises(UserError, match=f"OUT {tmp_path}/slice_t2.png exists already; pass --overwrite"):
        translate.main([ckpt, str(tmp_path / "slice_t1.png"), str(tmp_path / "slice_t2.png"), "--device", "cpu"])
    assert (tmp_path / "slice_t2.png").read_bytes() == b"mine"
    assert translate.main([ckpt, str(tmp_path / "slice_t1.png"), str(tmp_path / "slice_t2.png"), "--device", "cpu",
                           "--overwrite"]) == 0
    assert Image.open(tmp_path / "slice_t2.png").size == (64, 64)
