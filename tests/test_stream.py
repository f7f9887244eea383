"""Streaming prune of sharded checkpoints, and the fast paths it relies on (Gram-route decomposition,
column selection without copies, shared weights). The oracle: the in-memory route, ``save_pruned(prune(...))``."""

import importlib

import pytest
import torch
from safetensors.torch import load_file

import clover_core as cc
from clover_core.__main__ import main
from clover_core.io.stream import stream_prune
from clover_core.orthogonalize import orthogonalize
from clover_core.prune import PruneConfig, select_columns

from .conftest import unet_inputs
from .helpers import assert_same_checkpoint, logits
from .tolerances import FP32, SAME_MATH, SAME_MATH_FP16

engine = importlib.import_module(
    "clover_core.orthogonalize"
)  # the module (the package re-exports a function of that name)


def sharded(model, path):
    """``save_pretrained`` in many small shards, the layout of large hub checkpoints."""
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 3
    return path


@pytest.mark.parametrize(
    "mode,kw", [("uniform", dict(ratio=0.5)), ("global", dict(ratio=0.6)), ("threshold", dict(threshold=0.5))]
)
def test_streamed_gpt2_equals_the_in_memory_route(make_gpt2, tokens, tmp_path, mode, kw):
    src = sharded(make_gpt2("5x8"), tmp_path / "src")
    model = cc.load_model(src).model
    expected = cc.save_pruned(cc.prune(model, target="both", mode=mode, **kw), tmp_path / "memory")
    out, skeleton = stream_prune(
        src, tmp_path / "stream", PruneConfig(target="both", mode=mode, **kw), max_shard_size="30KB"
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1  # written in shards
    assert next(skeleton.parameters()).is_meta  # the model never existed in memory
    assert cc.metrics.parameter_count(skeleton) == cc.metrics.parameter_count(cc.load_pruned(out))
    assert_same_checkpoint(expected, out, tokens)
    assert (out / "README.md").is_file() and (out / "modeling_clover_gpt2.py").is_file()


def test_streamed_llama_gqa_vo_global_equals_the_in_memory_route(make_llama, tmp_path):
    src = sharded(make_llama(bias=True), tmp_path / "src")
    model = cc.load_model(src).model
    expected = cc.save_pruned(cc.prune(model, ratio=0.5, target="vo", mode="global"), tmp_path / "memory")
    out, _ = stream_prune(src, tmp_path / "stream", PruneConfig(ratio=0.5, target="vo", mode="global"))
    assert (out / "model.safetensors").is_file()  # small enough for one output file
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    assert_same_checkpoint(expected, out, ids)


def test_streamed_dtype_cast(make_gpt2, tokens, tmp_path):
    src = sharded(make_gpt2("3x16"), tmp_path / "src")
    expected = cc.save_pruned(
        cc.prune(cc.load_model(src).model, ratio=0.25, target="vo"), tmp_path / "memory", dtype=torch.float16
    )
    out, _ = stream_prune(src, tmp_path / "stream", PruneConfig(ratio=0.25, target="vo"), dtype=torch.float16)
    assert {t.dtype for f in out.glob("*.safetensors") for t in load_file(f).values()} == {torch.float16}
    assert_same_checkpoint(expected, out, tokens)


def test_rotary_qk_request_fails_before_writing(make_llama, tmp_path):
    src = sharded(make_llama(), tmp_path / "src")
    with pytest.raises(ValueError, match="rotary"):
        stream_prune(src, tmp_path / "out", PruneConfig(ratio=0.5, target="qk"))
    assert not any(p.name.startswith(".out") or p.name == "out" for p in tmp_path.iterdir())


def test_cli_streams_a_sharded_folder(make_gpt2, tokens, tmp_path, capsys):
    src = sharded(make_gpt2("5x8"), tmp_path / "src")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--ratio", "0.5", "--mode", "global", "--out", str(out)]) == 0
    assert "streamed" in capsys.readouterr().out
    expected = cc.save_pruned(cc.prune(cc.load_model(src).model, ratio=0.5, mode="global"), tmp_path / "memory")
    assert_same_checkpoint(expected, out, tokens)


def test_a_truncated_shard_is_named(make_gpt2, tmp_path):
    src = sharded(make_gpt2("5x8"), tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        stream_prune(src, tmp_path / "out", PruneConfig(ratio=0.5))


def assert_same_unet(a, b):
    ma, mb = cc.load_pruned(a), cc.load_pruned(b)
    assert ma.config.clover == mb.config.clover
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    tol = SAME_MATH_FP16 if any(t.dtype == torch.float16 for t in sa.values()) else SAME_MATH
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        torch.testing.assert_close(sa[key], sb[key], **tol, msg=key)
    sample, t, text, added = unet_inputs()
    with torch.no_grad():
        out_a, out_b = (m.float()(sample, t, text, added_cond_kwargs=added).sample for m in (ma, mb))
    torch.testing.assert_close(out_a, out_b, **tol)


@pytest.mark.slow
def test_streamed_diffusers_unet_equals_the_in_memory_route(make_unet, tmp_path):
    """A sharded diffusers model (``diffusion_pytorch_model-*`` behind its index) streams, and is
    written back in that layout."""
    make_unet().save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = cc.load_model(tmp_path / "src").model
    expected = cc.save_pruned(cc.prune(model, ratio=0.5, target="both", mode="global"), tmp_path / "memory")
    out, skeleton = stream_prune(
        tmp_path / "src",
        tmp_path / "stream",
        PruneConfig(ratio=0.5, target="both", mode="global"),
        max_shard_size="60KB",
    )
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(out.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert not list(out.glob("model*.safetensors*"))  # the layout it came in
    assert next(skeleton.parameters()).is_meta
    config = {k: v for k, v in read_json(out / "config.json").items() if k != "_name_or_path"}
    assert config == {k: v for k, v in read_json(expected / "config.json").items() if k != "_name_or_path"}
    assert (out / "modeling_clover_unet.py").is_file()
    assert_same_unet(expected, out)


def test_cli_streams_a_diffusers_model_saved_in_one_file(make_unet, tmp_path, capsys):
    """Diffusers ships big models unsharded (SDXL's UNet: one 10 GB file); they stream all the same."""
    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    expected = cc.save_pruned(cc.prune(unet, ratio=0.25, target="qk"), tmp_path / "memory", dtype=torch.float16)
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--model",
        str(tmp_path / "unet"),
        "--ratio",
        "0.25",
        "--target",
        "qk",
        "--dtype",
        "float16",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "streamed module by module" in printed and "KV-cache" not in printed  # a UNet keeps no cache
    assert {t.dtype for t in load_file(out / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert_same_unet(expected, out)


@pytest.mark.slow
def test_cli_streams_a_pipelines_unet_and_reads_nothing_else(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    unet, pipe = cc.zoo.sdxl_tiny_random()
    pipe.save_pretrained(tmp_path / "pipe")
    expected = cc.save_pruned(cc.prune(unet, ratio=0.5, target="vo", mode="global"), tmp_path / "memory")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole pipeline was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--model",
        str(tmp_path / "pipe"),
        "--ratio",
        "0.5",
        "--mode",
        "global",
        "--target",
        "vo",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "saved the pipeline's UNet" in capsys.readouterr().out
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and not (out / "model_index.json").exists()
    assert_same_unet(expected, out)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"_class_name": "Nope"}, "names _class_name='Nope', which is not a diffusers model class"),
        (
            {
                "_class_name": "UNet2DConditionModel",
                "down_block_types": ["Nope"],
                "up_block_types": ["Nope"],
                "block_out_channels": [32],
            },
            "config.json does not describe a valid UNet2DConditionModel",
        ),
        ({"_class_name": "UNet2DConditionModel"}, "the checkpoint lacks 686 tensors the model needs"),
    ],
)
def test_a_broken_diffusers_folder_is_named_before_anything_is_written(config, message, tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert main(["prune", "--model", str(tmp_path / "unet"), "--ratio", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def read_json(path):
    import json

    return json.loads(path.read_text())


# The decomposition routes: Gram (two GEMM passes) for ordinary heads, Householder QR for the rest.


def ill_conditioned(g=3, m=40, k=8, cond=1e5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(g, m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(g, k, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((q * s) @ v.mT).float()  # (g, m, k) with condition number cond


def check_exact(a, b):
    a2, b2, s = orthogonalize(a, b)
    product = a.double() @ b.double().mT
    err = (a2.double() @ b2.double().mT - product).norm(dim=(1, 2)) / product.norm(dim=(1, 2))
    assert err.max() < 1e-5
    ref = torch.linalg.svdvals(product)[:, : a.shape[2]]
    torch.testing.assert_close(s.double(), ref, atol=1e-5 * ref.max().item(), rtol=1e-4)
    return a2, b2, s


def test_ordinary_factors_take_the_gram_route(monkeypatch):
    def refuse(*args):
        raise AssertionError("the Householder fallback ran on well-conditioned factors")

    monkeypatch.setattr(engine, "_householder", refuse)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 65, 16, generator=gen), torch.randn(4, 70, 16, generator=gen)
    a2, b2, s = check_exact(a, b)
    eye_s = torch.diag_embed(s)
    torch.testing.assert_close(a2.mT @ a2, eye_s, **FP32)
    torch.testing.assert_close(b2.mT @ b2, eye_s, **FP32)


def test_ill_conditioned_and_rank_deficient_factors_fall_back_exactly(monkeypatch):
    calls = []
    real = engine._householder
    monkeypatch.setattr(engine, "_householder", lambda a, b: calls.append(len(a)) or real(a, b))
    a = ill_conditioned()
    b = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(1))
    check_exact(a, b)
    assert calls == [3]
    check_exact(b, ill_conditioned(seed=3))  # the right factor's conditioning is checked too
    assert calls == [3, 3]
    padded = torch.nn.functional.pad(b[:, :, :5], (0, 3))  # a pruned, zero-padded head decomposed again
    _, _, s = check_exact(padded, torch.randn(3, 30, 8, generator=torch.Generator().manual_seed(2)))
    assert (s[:, 5:] == 0).all()


def test_selected_leading_columns_equal_the_gathered_ones():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 9, 8, generator=gen), torch.randn(4, 7, 8, generator=gen)
    score = torch.rand(4, 8, generator=gen).sort(dim=1, descending=True).values
    ranks = torch.tensor([[5], [3], [0], [5]])
    kept = torch.arange(8)[None] < ranks  # leading columns, ragged ranks
    fast = select_columns(a, b, score, kept)
    live = (torch.arange(5)[None] < ranks).float()[:, None, :]  # (G, 1, 5)
    expected = (a[..., :5] * live, b[..., :5] * live)
    rev = torch.arange(8).flip(0)  # the same columns in reverse order: the general gather path
    gathered = select_columns(a[..., rev], b[..., rev], score[:, rev], kept[:, rev])
    for x, y, z in zip(fast, expected, gathered):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    assert select_columns(a, b, score, torch.ones_like(kept)) == (a, b)  # nothing pruned: untouched


def test_shared_weights_are_shared_and_give_the_same_model(make_gpt2, tokens):
    model = make_gpt2("5x8")
    dec = cc.decompose(model)
    shared = cc.prune(dec, ratio=0.5, target="both", share_weights=True)
    copied = cc.prune(dec, ratio=0.5, target="both")
    assert shared.transformer.wte.weight is model.transformer.wte.weight
    assert shared.transformer.h[0].mlp.c_fc.weight is model.transformer.h[0].mlp.c_fc.weight
    assert copied.transformer.wte.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert shared.config is not model.config and "clover" not in model.config.to_dict()
    for name, md in dec.modules.items():  # the same kept directions, in the shared (rank-major) layout
        a, b = md.adapter.factors(shared.get_submodule(name)), md.adapter.factors(copied.get_submodule(name))
        assert all(torch.equal(x, y) for p in a for x, y in zip(a[p], b[p])), name
    # the same model up to the order in which the output projection adds up its features
    torch.testing.assert_close(logits(shared, tokens), logits(copied, tokens), **SAME_MATH)


@pytest.mark.slow
@pytest.mark.parametrize("shard_size", [None, "40KB"])
def test_cli_streams_variant_weights_as_it_streams_plain_ones(make_unet, tmp_path, shard_size):
    """A UNet saved with ``variant="fp16"`` (one file or shards behind the variant's index) streams to the
    checkpoint its plain-named copy gives, written with plain names."""
    unet = make_unet().half()
    kw = {"max_shard_size": shard_size} if shard_size else {}
    unet.save_pretrained(tmp_path / "plain", **kw)
    unet.save_pretrained(tmp_path / "variant", variant="fp16", **kw)
    assert not {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"} & {
        p.name for p in (tmp_path / "variant").iterdir()
    }
    for src in ("plain", "variant"):
        argv = [
            "prune",
            "--model",
            str(tmp_path / src),
            "--ratio",
            "0.5",
            "--mode",
            "global",
            "--target",
            "both",
            "--out",
            str(tmp_path / f"out-{src}"),
        ]
        assert main(argv) == 0
    a, b = (load_file(tmp_path / f"out-{src}" / "diffusion_pytorch_model.safetensors") for src in ("plain", "variant"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float16 for k in a)


def cache_snapshot(cache, repo_id, save):
    """A repository in a Hugging Face cache laid out as downloads leave it (refs/main -> snapshots/<commit>),
    its files written by ``save(folder)``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    save(repo / "snapshots" / "0123abcd")
    return repo / "snapshots" / "0123abcd"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; any attempt to reach the Hub fails the test (unreachable, it
    would cost retries with backoff: 23 s in transformers' PEFT adapter probe, which ignored
    ``local_files_only``)."""
    from huggingface_hub import constants, file_download

    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise OSError(f"no network in this test: {url}")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield tmp_path / "hub"
    assert attempts == []


@pytest.mark.slow
def test_a_cached_hub_pipeline_streams_its_unet_and_records_the_hub_id(hub_cache, tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    from clover_core.io.stream import streamable

    pipe = cc.zoo.sdxl_tiny_random()[1]
    snapshot = cache_snapshot(hub_cache, "someone/tiny-sdxl", pipe.save_pretrained)
    assert streamable("someone/tiny-sdxl") == snapshot / "unet"
    assert streamable("someone/not-cached") is None and streamable("not a repo id!") is None
    cache_snapshot(hub_cache, "gpt2-tiny-random", pipe.save_pretrained)  # a cached repo named like an offline model
    assert streamable("gpt2-tiny-random") is None  # the offline model it names
    loaded = cc.load_model("someone/tiny-sdxl").model  # the in-memory route, from the same cache
    expected = cc.save_pruned(cc.prune(loaded, ratio=0.5, target="vo"), tmp_path / "memory")
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    argv = ["prune", "--model", "someone/tiny-sdxl", "--ratio", "0.5", "--target", "vo", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "saved the pipeline's UNet" in capsys.readouterr().out
    pruned = cc.load_pruned(tmp_path / "out")
    assert pruned.config["clover"]["base_model"] == "someone/tiny-sdxl"
    assert "someone/tiny-sdxl" in (tmp_path / "out" / "README.md").read_text()
    assert_same_unet(expected, tmp_path / "out")


def test_a_cached_sharded_hub_model_streams_unless_a_shard_is_missing(hub_cache, make_gpt2, tokens, tmp_path):
    from clover_core.io.stream import streamable

    model = make_gpt2()
    snapshot = cache_snapshot(hub_cache, "someone/tiny-gpt2", lambda folder: sharded(model, folder))
    assert streamable("someone/tiny-gpt2") == snapshot
    argv = ["prune", "--model", "someone/tiny-gpt2", "--ratio", "0.5", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert cc.load_pruned(tmp_path / "out").config.clover["base_model"] == "someone/tiny-gpt2"
    loaded = cc.load_model("someone/tiny-gpt2").model  # the in-memory route, from the same cache
    assert_same_checkpoint(cc.save_pruned(cc.prune(loaded, ratio=0.5), tmp_path / "memory"), tmp_path / "out", tokens)
    next(snapshot.glob("model-*.safetensors")).unlink()  # a partly downloaded snapshot: loaded whole instead
    assert streamable("someone/tiny-gpt2") is None


def test_cli_streams_single_file_language_and_speech_models(make_gpt2, make_whisper, tokens, tmp_path, capsys):
    """One ``model.safetensors`` streams too (GPT-2 XL ships as one 6 GB file, Whisper large-v3 as one
    3 GB file): the checkpoint the in-memory route writes."""
    gpt2, whisper = make_gpt2(), make_whisper()
    for name, model in (("gpt2", gpt2), ("whisper", whisper)):
        model.save_pretrained(tmp_path / name)
        argv = [
            "prune",
            "--model",
            str(tmp_path / name),
            "--ratio",
            "0.5",
            "--mode",
            "global",
            "--target",
            "both",
            "--out",
            str(tmp_path / f"{name}-out"),
        ]
        assert main(argv) == 0
        printed = capsys.readouterr()
        assert "streamed module by module" in printed.out
        assert "scoring attention" in printed.err and "pruning and writing" in printed.err  # progress bars
        cc.save_pruned(cc.prune(model, ratio=0.5, mode="global", target="both"), tmp_path / f"{name}-memory")
    assert_same_checkpoint(tmp_path / "gpt2-memory", tmp_path / "gpt2-out", tokens)
    ma, mb = cc.load_pruned(tmp_path / "whisper-memory"), cc.load_pruned(tmp_path / "whisper-out")
    assert ma.config.clover == mb.config.clover
    features, decoder_ids = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(0)), tokens[:1, :6]
    with torch.no_grad():
        got, expected = (m(input_features=features, decoder_input_ids=decoder_ids).logits for m in (mb, ma))
    torch.testing.assert_close(got, expected, **SAME_MATH)


def test_cli_spectra_of_a_folder_reads_one_module_at_a_time(make_gpt2, make_whisper, make_llama, tmp_path, monkeypatch):
    """``spectra --model DIR`` streams (no model is ever loaded) and writes ``cc.spectra(model)``."""
    import json

    import clover_core.__main__ as cli

    models_by_name = {"gpt2": make_gpt2(), "whisper": make_whisper(), "llama": make_llama()}
    sharded(models_by_name["gpt2"], tmp_path / "gpt2")
    models_by_name["whisper"].save_pretrained(tmp_path / "whisper")
    models_by_name["llama"].save_pretrained(tmp_path / "llama")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))
    for name, model in models_by_name.items():
        out = tmp_path / f"{name}.json"
        assert main(["spectra", "--model", str(tmp_path / name), "--out", str(out)]) == 0
        got, expected = json.loads(out.read_text()), cc.spectra(model)
        assert list(got) == list(expected) and all(set(got[m]) == set(expected[m]) for m in expected)
        for module, pairs in expected.items():
            for pair, s in pairs.items():
                torch.testing.assert_close(torch.tensor(got[module][pair]), s, **SAME_MATH)
