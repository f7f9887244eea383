"""The embedded offline model ``smollm2-135m``: real SmolLM2-135M-Instruct weights read from a GGUF file.

The GGUF conversion (~30 s on 2 cores) runs once per test session, into a fresh cache folder; every
other test reads that cache. Rebuilding a broken cache hands back the session's converted model
instead of parsing the GGUF file a second time (only the file reading is skipped, never the model).
"""

import json
import os
import shutil
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from clover_core import decompose, load_model, prune
from clover_core.data import hamlet_ids
from clover_core.metrics import perplexity
from clover_core.zoo import gguf as gm

from .helpers import logits
from .tolerances import FP32

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

NAME = "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """``(cache folder, model, tokenizer)``: the GGUF file converted once, with ``CLOVER_CACHE`` in a tmp dir."""
    root = tmp_path_factory.mktemp("clover_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOVER_CACHE", str(root))
        bundle = load_model(NAME)  # no cache yet: converts the GGUF file and writes the cache
    return root / NAME, bundle.model, bundle.processor


@pytest.fixture(scope="session")
def smollm2_dec(smollm2):
    return decompose(smollm2[1])


def short_input(tokenizer):
    return hamlet_ids(tokenizer, 24)[None]  # (1, 24)


def test_converted_model_is_smollm2_in_float32(smollm2):
    folder, model, tokenizer = smollm2
    assert gm.cache_is_valid(folder, gm.SMOLLM2_135M.fingerprint())
    assert isinstance(model, LlamaForCausalLM) and not hasattr(model.config, "quantization_config")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template


def test_second_load_reads_the_cache(smollm2, monkeypatch):
    folder, model, tokenizer = smollm2

    def no_conversion(path):
        raise AssertionError(f"a valid cache exists, yet {path} was converted again")

    monkeypatch.setattr(gm, "convert_gguf", no_conversion)
    monkeypatch.setenv("CLOVER_CACHE", str(folder.parent))
    again = load_model(NAME)
    ids = short_input(tokenizer)
    assert torch.equal(logits(again.model, ids), logits(model, ids))  # safetensors float32 is lossless
    assert again.processor.chat_template == tokenizer.chat_template


def test_hamlet_perplexity(smollm2):
    """The issue's real-data check: 8 non-overlapping 512-token windows of Hamlet."""
    _, model, tokenizer = smollm2
    ids = hamlet_ids(tokenizer, 4096)
    assert ids.shape == (4096,)
    ppl = perplexity(model, ids, window=512, stride=512, progress=False)
    print(f"smollm2-135m Hamlet perplexity (8 x 512 tokens): {ppl:.2f}")
    assert ppl < 60


def test_chat_generation_answers(smollm2):
    _, model, tokenizer = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_vo_prune_ratio_zero_reproduces_logits(smollm2, smollm2_dec):
    _, model, tokenizer = smollm2
    ids = short_input(tokenizer)
    reference = logits(model, ids)
    halved = logits(prune(smollm2_dec, ratio=0.5, target="vo", method="clover"), ids)
    assert not torch.allclose(halved, reference, **FP32)  # sensitivity: pruning does change the output
    full = prune(smollm2_dec, ratio=0.0, target="vo", method="clover", mode="global")
    torch.testing.assert_close(logits(full, ids), reference, **FP32)


@pytest.mark.parametrize("target", ["qk", "both"])
def test_qk_prune_is_refused(smollm2_dec, target):
    with pytest.raises(ValueError, match="rotary"):
        prune(smollm2_dec, ratio=0.25, target=target)


def _rewrite(path, data: bytes):
    """Replace a hard-linked file by a new one: never write through the link into the session's cache."""
    path.unlink()
    path.write_bytes(data)


def _break(copy, how):
    weights, config = copy / "model.safetensors", copy / "config.json"
    if how == "missing weights":
        weights.unlink()
    elif how == "truncated weights":
        with open(weights, "rb") as f:
            head = f.read(1 << 20)  # the whole header, a sliver of the data
        _rewrite(weights, head)
    elif how == "garbage weights":
        _rewrite(weights, os.urandom(1 << 20))
    elif how == "stale source":  # converted from another file
        _rewrite(copy / gm.SOURCE_FILE, json.dumps({"dist": "other", "filename": "x.gguf", "bytes": 1}).encode())
    else:  # a config that no longer matches the weights: transformers would silently re-initialize a layer
        _rewrite(config, config.read_bytes().replace(b'"num_hidden_layers": 30', b'"num_hidden_layers": 31'))


BREAKS = ["missing weights", "truncated weights", "garbage weights", "stale source", "config does not match weights"]


@pytest.fixture
def broken_cache(smollm2, tmp_path):
    """Factory: a hard-linked copy of the session's cache, broken in the named way."""

    def make(how):
        copy = tmp_path / NAME
        shutil.copytree(smollm2[0], copy, copy_function=os.link)  # hard links: no 540 MB copy
        _break(copy, how)
        return copy

    return make


@pytest.mark.parametrize("how", BREAKS)
def test_broken_cache_is_detected(broken_cache, how):
    copy = broken_cache(how)
    if how == "config does not match weights":  # passes the file checks; the strict load refuses it
        assert gm.cache_is_valid(copy, gm.SMOLLM2_135M.fingerprint())
        with pytest.raises(ValueError, match="do not match its config"):
            gm.load_cached(copy)
    else:
        assert not gm.cache_is_valid(copy, gm.SMOLLM2_135M.fingerprint())


@pytest.mark.parametrize("how", ["missing weights", "config does not match weights"])  # both rebuild paths
def test_broken_cache_is_rebuilt(smollm2, broken_cache, monkeypatch, how):
    _, model, tokenizer = smollm2
    copy = broken_cache(how)
    calls = []

    def converted(path):  # the session already converted this file: hand back its result
        calls.append(path)
        return model, tokenizer

    monkeypatch.setattr(gm, "convert_gguf", converted)
    gm.load_gguf(gm.SMOLLM2_135M, copy)
    assert calls == [gm.SMOLLM2_135M.path()]
    assert gm.cache_is_valid(copy, gm.SMOLLM2_135M.fingerprint())
    reread, _ = gm.load_cached(copy)
    ids = short_input(tokenizer)
    assert torch.equal(logits(reread, ids), logits(model, ids))


def test_the_cache_gets_the_permissions_of_the_umask(make_llama, smollm2, tmp_path):
    old = os.umask(0o022)
    try:
        folder = gm.write_cache(make_llama(), smollm2[2], tmp_path / NAME, {"dist": "test", "filename": "t.gguf"})
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_concurrent_writers_leave_one_complete_cache(make_llama, smollm2, tmp_path):
    """Two processes converting at once: both renames race, the folder ends up whole, no temp folder is left."""
    tokenizer = smollm2[2]
    model, fingerprint, folder = make_llama(), {"dist": "test", "filename": "tiny.gguf", "bytes": 1}, tmp_path / NAME
    folder.mkdir()
    (folder / "config.json").write_text("{")  # a broken earlier attempt, to be replaced
    barrier, errors = threading.Barrier(2), []

    def write():
        try:
            barrier.wait()
            gm.write_cache(model, tokenizer, folder, fingerprint)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert gm.cache_is_valid(folder, fingerprint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]
    reread, _ = gm.load_cached(folder)
    ids = torch.randint(1, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(reread, ids), logits(model, ids), **FP32)
