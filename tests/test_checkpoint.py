import json
import os

import pytest
import torch

import clover_core as cc
from clover_core.io import weights
from clover_core.io.stream import stream_prune
from clover_core.prune import PruneConfig

from .helpers import logits
from .tolerances import FP32


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


def modes(folder):
    """The permission bits of ``folder`` and of everything in it."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_checkpoints_get_the_permissions_of_the_umask(pruned, make_gpt2, tmp_path, umask):
    """Written in an owner-only temporary folder, published as ``mkdir`` and ``open`` would have made it."""
    expected = {".": 0o777 & ~umask} | {p: 0o666 & ~umask for p in ("model.safetensors", "config.json", "README.md")}
    make_gpt2("5x8").save_pretrained(tmp_path / "src")
    streamed, _ = stream_prune(tmp_path / "src", tmp_path / "streamed", PruneConfig(ratio=0.5))
    for out in (cc.save_pruned(pruned, tmp_path / "ckpt"), streamed):
        got = modes(out)
        assert {p: got[p] for p in expected} == expected, out
        assert set(got.values()) == {0o777 & ~umask, 0o666 & ~umask}  # nothing left owner-only, nothing executable


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
    assert weights.is_checkpoint(saved)
    assert not weights.is_checkpoint(tmp_path)


# --------------------------------------------------------------------------- sharded and damaged files


@pytest.fixture
def sharded(pruned, tmp_path):
    out = cc.save_pruned(pruned, tmp_path / "sharded", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    return out


def test_sharded_checkpoint_round_trips(sharded, pruned, tokens):
    assert len(weights.weight_files(sharded).files) > 1
    torch.testing.assert_close(logits(cc.load_pruned(sharded), tokens), logits(pruned, tokens), **FP32)


def test_truncated_or_missing_shard_names_the_shard(sharded):
    first, second = weights.weight_files(sharded).files[:2]
    first.write_bytes(first.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{first.name} cannot be read.*corrupted or truncated"):
        cc.load_pruned(sharded)
    first.unlink()
    with pytest.raises(ValueError, match=f"{first.name} cannot be read"):
        cc.load_pruned(sharded)


def test_corrupted_index_and_header_name_the_file(sharded, saved):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid safetensors index"):
        cc.load_pruned(sharded)
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # a header length far past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors cannot be read.*corrupted or truncated"):
        cc.load_pruned(saved)


# --------------------------------------------------------------------------- model card


def read_card(folder):
    """The card's YAML front matter (dict) and body rows ``{label: [cells]}``."""
    import yaml

    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            label, *cells = [c.strip() for c in line.strip("|").split("|")]
            rows[label] = cells
    return yaml.safe_load(front), rows, body


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


CARD_CASES = {  # family -> fixture, target, library, auto class in the loading example
    "gpt2": ("make_gpt2", "both", "transformers", "AutoModelForCausalLM"),
    "llama": ("make_llama", "vo", "transformers", "AutoModelForCausalLM"),
    "whisper": ("make_whisper", "both", "transformers", "AutoModelForSpeechSeq2Seq"),
    "unet": ("make_unet", "qk", "diffusers", "AutoModel"),
}


@pytest.mark.parametrize("family", list(CARD_CASES))
def test_model_card_reports_the_true_figures(family, request, tmp_path):
    from clover_core.metrics import kv_cache_bytes_per_token, parameter_count

    fixture, target, library, auto = CARD_CASES[family]
    original = request.getfixturevalue(fixture)()
    pruned = cc.prune(original, ratio=0.4, target=target, mode="global")
    folder = cc.save_pruned(pruned, tmp_path / f"pruned-{family}")
    meta, rows, body = read_card(folder)

    assert meta["library_name"] == library and meta["tags"] == ["clover", "pruning"]
    assert "base_model" not in meta  # built from a config: no Hub id to name
    assert [number(c) for c in rows["parameters"]] == [parameter_count(original), parameter_count(pruned)]
    assert parameter_count(pruned) < parameter_count(original)
    if family == "unet":
        assert rows["KV-cache bytes per token"] == ["none (no KV cache)", "none"]
    else:
        kv = [number(c) for c in rows["KV-cache bytes per token (float32)"]]
        assert kv == [kv_cache_bytes_per_token(original), kv_cache_bytes_per_token(pruned)]
        assert kv[1] < kv[0]
    assert rows["method"] == ["clover"] and rows["mode"] == ["global"] and rows["ratio"][0].startswith("0.4 ")
    assert f'{auto}.from_pretrained("pruned-{family}", trust_remote_code=True)' in body
    assert f'cc.load_pruned("pruned-{family}")' in body
    assert json.loads((folder / "config.json").read_text())["auto_map"][auto].startswith("modeling_clover_")


def test_model_card_survives_reload_and_reports_the_saved_dtype(pruned, make_gpt2, tmp_path):
    from clover_core.metrics import kv_cache_bytes_per_token

    first = cc.save_pruned(pruned, tmp_path / "first")
    again = cc.save_pruned(cc.load_pruned(first), tmp_path / "again", dtype=torch.float16)
    _, rows_first, _ = read_card(first)
    _, rows_again, _ = read_card(again)
    assert rows_again["parameters"] == rows_first["parameters"]  # "before" travels in the record
    full = kv_cache_bytes_per_token(make_gpt2("5x8"))  # float32
    assert [number(c) for c in rows_again["KV-cache bytes per token (float16)"]] == [
        full // 2,
        kv_cache_bytes_per_token(pruned) // 2,
    ]
    assert json.loads((again / "config.json").read_text())["dtype"] == "float16"


def test_model_card_names_a_hub_base_model_but_never_a_local_path(make_gpt2, tmp_path):
    model = make_gpt2()
    model.config._name_or_path = "openai-community/gpt2"
    meta, _, body = read_card(cc.save_pruned(cc.prune(model, ratio=0.5), tmp_path / "hub"))
    assert meta["base_model"] == "openai-community/gpt2" and "`openai-community/gpt2` with its attention" in body
    model.config._name_or_path = str(tmp_path)
    meta, _, body = read_card(cc.save_pruned(cc.prune(model, ratio=0.5), tmp_path / "local"))
    assert "base_model" not in meta and str(tmp_path) not in body


def test_a_pipeline_as_processor_writes_only_the_unet(make_unet, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = make_unet()
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    folder = cc.save_pruned(cc.prune(unet, ratio=0.5, target="vo"), tmp_path / "unet", processor=pipe)
    assert not (folder / "model_index.json").exists() and not (folder / "unet").exists()
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
