import json

import pytest
import torch

import clover_core as cc
from clover_core import checkpoint

from .tolerances import FP32


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def pruned(make_gpt2):
    return cc.prune(make_gpt2("5x8"), ratio=0.5, target="both", mode="global")


def test_save_load_reproduces_logits_and_writes_no_pickle(pruned, tokens, tmp_path):
    out = cc.save_pruned(pruned, tmp_path / "ckpt")
    again = cc.load_pruned(out)
    torch.testing.assert_close(logits(again, tokens), logits(pruned, tokens), **FP32)
    assert again.config.clover["ranks"] == pruned.config.clover["ranks"]
    for f in out.iterdir():
        assert f.suffix in {".json", ".safetensors", ".md", ".txt", ".py"}, f
        assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"
        assert not f.read_bytes().startswith(b"PK"), f"{f} looks like a torch zip"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_float16_saving(pruned, tmp_path):
    again = cc.load_pruned(cc.save_pruned(pruned, tmp_path / "half", dtype=torch.float16))
    assert next(again.parameters()).dtype == torch.float16


def test_overwriting_an_earlier_checkpoint_works(pruned, make_gpt2, tmp_path, tokens):
    cc.save_pruned(pruned, tmp_path / "ckpt")
    other = cc.prune(make_gpt2("5x8"), ratio=0.25, target="qk")
    cc.save_pruned(other, tmp_path / "ckpt")
    torch.testing.assert_close(logits(cc.load_pruned(tmp_path / "ckpt"), tokens), logits(other, tokens), **FP32)


def test_failed_save_leaves_nothing_behind(pruned, tmp_path, monkeypatch):
    def fail(self, *a, **k):
        (a[0] / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(pruned), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        cc.save_pruned(pruned, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(pruned, tmp_path, monkeypatch, tokens):
    cc.save_pruned(pruned, tmp_path / "ckpt")
    monkeypatch.setattr(type(pruned), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        cc.save_pruned(pruned, tmp_path / "ckpt")
    monkeypatch.undo()
    torch.testing.assert_close(logits(cc.load_pruned(tmp_path / "ckpt"), tokens), logits(pruned, tokens), **FP32)


def test_refuses_to_overwrite_a_foreign_folder(pruned, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a CLOVER checkpoint"):
        cc.save_pruned(pruned, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_save_refuses_unpruned_models_and_bad_dtypes(make_gpt2, pruned, tmp_path):
    with pytest.raises(ValueError, match="returned by clover_core.prune"):
        cc.save_pruned(make_gpt2(), tmp_path / "x")
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        cc.save_pruned(pruned, tmp_path / "x", dtype=torch.int8)


@pytest.fixture
def saved(pruned, tmp_path):
    return cc.save_pruned(pruned, tmp_path / "ckpt")


def test_truncated_weights_name_the_file(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors.*corrupted or truncated"):
        cc.load_pruned(saved)


def test_corrupted_config_names_the_file(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        cc.load_pruned(saved)


def test_foreign_folders_are_refused(saved, make_gpt2, tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        cc.load_pruned(tmp_path)
    plain = tmp_path / "plain"
    make_gpt2().save_pretrained(plain)
    with pytest.raises(ValueError, match="is not a CLOVER checkpoint"):
        cc.load_pruned(plain)


def test_tampered_shapes_are_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    name = next(iter(config["clover"]["ranks"]))
    config["clover"]["ranks"][name]["qk"] = [8] * 5  # no longer matches the stored tensors
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tampered"):
        cc.load_pruned(saved)


def test_is_checkpoint(saved, tmp_path):
    assert checkpoint.is_checkpoint(saved)
    assert not checkpoint.is_checkpoint(tmp_path)
