"""cc.Slider: one model re-pruned in place at any ratio, with the weights of cc.prune and no copies."""

import pytest
import torch

import clover_core as cc
from clover_core.io.checkpoint import load_pruned, save_pruned
from clover_core.prune import zero_padding

from .conftest import unet_inputs
from .tolerances import SAME_MATH

CASES = [  # (mode, arguments) of one slider position
    ("uniform", dict(ratio=0.5)),
    ("global", dict(ratio=0.4)),
    ("threshold", dict(threshold=0.05)),
    ("uniform", dict(ratio=0.0)),
]


def past_rank(ranks, width):
    """``(G, width)``: True for each head's columns past its rank (its padding)."""
    return torch.arange(width)[None] >= torch.tensor(ranks)[:, None]


def assert_same_weights(slid, pruned, dec, *, exact_padding=False):
    """Every pair's factors equal, read back from the slider's rank-major modules and prune's head-major
    ones. Past a head's rank prune zeroes both sides of a pair, a slider one side only (the same
    products): unless ``exact_padding`` (a saved slider), its padding is checked for that instead."""
    for name, md in dec.modules.items():
        module = slid.get_submodule(name)
        a, b = md.adapter.factors(module), md.adapter.factors(pruned.get_submodule(name))
        assert a.keys() == b.keys()
        for pair in a:
            (sa, sb), ranks = a[pair], module.clover_ranks[pair]
            padding = past_rank(ranks, sa.shape[-1])
            if not exact_padding:
                assert not (sa.abs().sum(1) * sb.abs().sum(1))[padding].any(), (name, pair)  # one side is zero
                sa, sb = zero_padding(sa, sb, ranks)
            assert torch.equal(sa, b[pair][0]) and torch.equal(sb, b[pair][1]), (name, pair)
    assert slid.config.clover["ranks"] == pruned.config.clover["ranks"]


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.sample


def models(make_gpt2, make_whisper, make_llama, make_unet, tokens):
    sample, t, text, added = unet_inputs()
    return {
        "gpt2": (make_gpt2("3x16"), {"input_ids": tokens}, "both"),
        "whisper": (
            make_whisper(),
            {
                "input_features": torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(0)),
                "decoder_input_ids": torch.tensor([[1, 5, 7, 9]]),
            },
            "both",
        ),
        "llama": (make_llama(bias=True), {"input_ids": tokens}, "vo"),
        "unet": (
            make_unet(),
            dict(sample=sample, timestep=t, encoder_hidden_states=text, added_cond_kwargs=added),
            "both",
        ),
    }


@pytest.mark.parametrize("arch", ["gpt2", "whisper", "llama", "unet"])
@pytest.mark.parametrize("method", ["clover", "vanilla"])
def test_slider_matches_prune(make_gpt2, make_whisper, make_llama, make_unet, tokens, arch, method, tmp_path):
    model, inputs, target = models(make_gpt2, make_whisper, make_llama, make_unet, tokens)[arch]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dec = cc.decompose(model)
    slider = cc.Slider(dec, method)
    first = None
    for mode, kw in CASES:
        slid = slider(target=target, mode=mode, **kw)
        first = first or slid
        assert slid is first  # one model object, re-pointed
        pruned = cc.prune(dec, target=target, method=method, mode=mode, **kw)
        assert_same_weights(slid, pruned, dec)
        torch.testing.assert_close(run(slid, inputs), run(pruned, inputs), **SAME_MATH)
    # saved head-major, as prune() builds it; the slider's model keeps its own layout
    slid = slider(0.4, target=target, mode="global")
    pruned = cc.prune(dec, 0.4, target=target, method=method, mode="global")
    again = load_pruned(save_pruned(slid, tmp_path / arch))
    assert_same_weights(again, pruned, dec, exact_padding=True)
    torch.testing.assert_close(run(again, inputs), run(pruned, inputs), **SAME_MATH)
    torch.testing.assert_close(run(slid, inputs), run(pruned, inputs), **SAME_MATH)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("how", ["slider", "share_weights"])
def test_uniform_clover_weights_are_views_of_the_decomposition(make_gpt2, tokens, how):
    model = make_gpt2("3x16")
    dec = cc.decompose(model)
    slid = cc.Slider(dec)(0.5, target="both") if how == "slider" else cc.prune(dec, 0.5, "both", share_weights=True)
    for name, md in dec.modules.items():
        module = slid.get_submodule(name)
        for proj, pair, side in (
            (module.q_proj, "qk", "a"),
            (module.k_proj, "qk", "b"),
            (module.v_proj, "vo", "a"),
            (module.c_proj, "vo", "b"),
        ):
            factor = getattr(md.pairs[pair], side)
            assert proj.weight.untyped_storage().data_ptr() == factor.untyped_storage().data_ptr(), (name, pair)
        assert module.q_proj.weight.shape == (48, 3 * 8)  # d = 48; 3 heads keep 8 of 16 directions
    # the MLPs and embeddings are the original's tensors
    assert slid.transformer.wte.weight is model.transformer.wte.weight
    assert slid.transformer.h[0].mlp.c_fc.weight is model.transformer.h[0].mlp.c_fc.weight
    # without share_weights nothing is shared, and the layout is the saved one: head-major, fused c_attn
    copied = cc.prune(dec, 0.5, "both")
    attn, md = copied.transformer.h[0].attn, dec.modules["transformer.h.0.attn"]
    assert not attn.rank_major and not hasattr(attn, "q_proj")
    assert attn.c_attn.weight.untyped_storage().data_ptr() != md.pairs["qk"].a.untyped_storage().data_ptr()
    assert attn.c_attn.weight.is_contiguous() and attn.c_attn.bias.is_contiguous()


def test_slider_moves_both_ways_and_saves(make_gpt2, tokens, tmp_path):
    model = make_gpt2("5x8")
    dec = cc.decompose(model)
    slider = cc.Slider(dec)
    reference = {r: run(cc.prune(dec, ratio=r, target="both"), {"input_ids": tokens}) for r in (0.25, 0.75)}
    for r in (0.75, 0.25, 0.75):
        torch.testing.assert_close(run(slider(r, target="both"), {"input_ids": tokens}), reference[r], **SAME_MATH)
    # weights that are views of one cached buffer (weight and bias together) save as separate tensors
    out = save_pruned(slider(0.25, target="both"), tmp_path / "pruned")
    torch.testing.assert_close(run(load_pruned(out), {"input_ids": tokens}), reference[0.25], **SAME_MATH)


def test_slider_rejects_bad_input(make_gpt2, make_llama):
    with pytest.raises(TypeError, match="needs a Decomposition"):
        cc.Slider(make_gpt2())
    dec = cc.decompose(make_gpt2())
    with pytest.raises(ValueError, match="method='pca' is not supported"):
        cc.Slider(dec, "pca")
    slider = cc.Slider(dec)
    with pytest.raises(ValueError, match="ratio=1.5 is out of range"):
        slider(1.5)
    with pytest.raises(ValueError, match="use target='vo'"):
        cc.Slider(cc.decompose(make_llama()))(0.5, target="qk")


def test_rank_major_storage_keeps_the_values_and_is_made_once(make_gpt2):
    dec = cc.decompose(make_gpt2("3x16"))
    pd = next(iter(dec.modules.values())).pairs["qk"]
    before = pd.a.clone()
    assert pd.a.is_contiguous()  # decompose writes the GEMM's own layout
    dec.use_rank_major()
    assert torch.equal(pd.a, before) and pd.a.permute(2, 0, 1).is_contiguous()
    a = pd.a
    cc.Slider(dec)
    assert pd.a is a  # already converted: no second copy


@pytest.mark.parametrize(
    "mode,values", [("global", (0.3, 0.6, 0.35, 0.9, 0.0, 0.5)), ("threshold", (0.05, 0.2, 0.01, 0.5, 0.1))]
)
def test_ragged_moves_update_one_buffer_in_place(make_gpt2, tokens, mode, values):
    """Global / threshold moves both ways: each equals prune(), and every move rewrites the same
    zero-padded buffers (only the columns that changed) instead of allocating new weights."""
    dec = cc.decompose(make_gpt2("5x8"))
    slider = cc.Slider(dec)
    storages, padded, unwritten = set(), 0, 0
    for value in values:
        kw = dict(threshold=value) if mode == "threshold" else dict(ratio=value)
        slid = slider(target="both", mode=mode, **kw)
        pruned = cc.prune(dec, target="both", mode=mode, **kw)
        assert_same_weights(slid, pruned, dec)
        torch.testing.assert_close(run(slid, {"input_ids": tokens}), run(pruned, {"input_ids": tokens}), **SAME_MATH)
        attn = slid.transformer.h[1].attn
        storages |= {attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr()}
        md = dec.modules["transformer.h.1.attn"]
        (a, b), ranks = md.adapter.factors(attn)["qk"], attn.clover_ranks["qk"]
        padding = past_rank(ranks, a.shape[-1])
        padded += int(padding.any())
        assert not a.abs().sum(1)[padding].any()  # the zeroed side: Q (as narrow as K, and first)
        unwritten += int(
            padding.any() and b.abs().sum(1)[padding].all()
        )  # K's columns are the decomposition's, never written
    assert len(storages) == 2  # Q's buffer and K's stacked factors, whatever the ranks
    assert padded and unwritten == padded


def test_ragged_buffer_zeroes_exactly_the_padding_modules_read(make_gpt2):
    """After every move, each ragged buffer is its side of the factors with, per head, the columns from
    its rank up to its layer's width zeroed, and nothing else changed: the rows past a layer's width
    (never read) stay the factors', so a move only rewrites rows whose zeroing changed."""
    dec = cc.decompose(make_gpt2("5x8"))
    slider = cc.Slider(dec)
    for ratio in (0.3, 0.9, 0.1, 0.6, 0.0, 0.75, 0.95):
        slider(ratio, target="both", mode="global")
        assert len(slider._ragged) == 2  # Q-K and V-O
        for ragged in slider._ragged.values():
            layers, k, groups = ragged.buffer.shape[:3]
            expected = ragged.source.clone()
            for layer in range(layers):
                ranks = ragged.ranks[layer].tolist()
                width = max(1, *ranks)
                for g, rank in enumerate(ranks):
                    expected[layer, rank:width, g] = 0
            assert torch.equal(ragged.buffer, expected), ratio
