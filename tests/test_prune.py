import itertools

import pytest
import torch

import clover_core as cc
from clover_core.metrics import kv_cache_bytes_per_token, output_cache, parameter_count

from .helpers import gpt2_head_products, logits
from .tolerances import FP32

MODES = [("uniform", dict(ratio=0.0)), ("global", dict(ratio=0.0))]


@pytest.mark.parametrize("shape", ["3x16", "5x8", "2x32"])
@pytest.mark.parametrize("method,target", list(itertools.product(["clover", "vanilla"], ["qk", "vo", "both"])))
def test_ratio_zero_reproduces_the_original(make_gpt2, tokens, shape, method, target):
    model = make_gpt2(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode, kw in MODES:
        pruned = cc.prune(model, target=target, method=method, mode=mode, **kw)
        torch.testing.assert_close(logits(pruned, tokens), logits(model, tokens), **FP32)
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k


def test_pruning_changes_outputs(make_gpt2, tokens):
    """Sensitivity check for the equality tests above: a real ratio does change the logits."""
    model = make_gpt2()
    exact = (logits(cc.prune(model, ratio=0.0, target="both"), tokens) - logits(model, tokens)).abs().max()
    changed = (logits(cc.prune(model, ratio=0.5, target="both"), tokens) - logits(model, tokens)).abs().max()
    assert changed > 1e-3 and changed > 1000 * exact


def head_products(model, name):
    """Per-head Q-K and V-O products of a (pruned or original) GPT-2 module, computed independently."""
    return gpt2_head_products(model.get_submodule(name))


@pytest.mark.parametrize("pair", ["qk", "vo"])
def test_kept_directions_are_optimal_per_head(make_gpt2, pair):
    model = make_gpt2("3x16")
    name = "transformer.h.1.attn"
    full = head_products(model, name)[pair].double()
    u, s, vh = torch.linalg.svd(full)
    for ratio in (0.25, 0.5, 0.75):
        r = round(16 * (1 - ratio))
        best = (u[..., :r] * s[:, None, :r]) @ vh[:, :r]
        clover = head_products(cc.prune(model, ratio=ratio, target=pair), name)[pair].double()
        vanilla = head_products(cc.prune(model, ratio=ratio, target=pair, method="vanilla"), name)[pair].double()
        torch.testing.assert_close(clover, best, atol=1e-4 * full.abs().max().item(), rtol=1e-4)
        err_c = (clover - full).norm(dim=(1, 2))
        err_v = (vanilla - full).norm(dim=(1, 2))
        assert (err_c <= err_v + 1e-6).all()
        assert (err_c < err_v).any()


def attention_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)


@pytest.mark.parametrize("target", ["qk", "vo", "both"])
def test_uniform_sizes_drop_exactly_as_the_ranks_predict(make_gpt2, target):
    model = make_gpt2("3x16")  # d=48, 3 heads of 16, 2 layers
    r = round(16 * (1 - 0.25))
    pruned = cc.prune(model, ratio=0.25, target=target)
    removed_dirs = 2 * 3 * (16 - r)  # layers * heads * directions
    per_dir = {"qk": 2 * (48 + 1), "vo": (48 + 1) + 48}
    pairs = ["qk", "vo"] if target == "both" else [target]
    expected = sum(removed_dirs * per_dir[p] for p in pairs)
    assert parameter_count(model) - parameter_count(pruned) == expected
    assert attention_params(model) - attention_params(pruned) == expected  # physically smaller too
    kv_removed = removed_dirs * len(pairs) * 4  # fp32 bytes
    assert kv_cache_bytes_per_token(model) - kv_cache_bytes_per_token(pruned) == kv_removed


def test_global_mode_removes_the_quantile_and_ranks_differ(make_gpt2):
    model = make_gpt2("5x8")
    dec = cc.decompose(model)
    pruned = cc.prune(dec, ratio=0.6, target="qk", mode="global")
    ranks = [r for d in pruned.config.clover["ranks"].values() for r in d["qk"]]
    assert sum(8 - r for r in ranks) == round(0.6 * 3 * 5 * 8)
    assert len(set(ranks)) > 1
    kept_scores = [
        dec.modules[n].pairs["qk"].s[h, :r]
        for n, d in pruned.config.clover["ranks"].items()
        for h, r in enumerate(d["qk"])
    ]
    dropped = [
        dec.modules[n].pairs["qk"].s[h, r:]
        for n, d in pruned.config.clover["ranks"].items()
        for h, r in enumerate(d["qk"])
    ]
    assert torch.cat(kept_scores).min() >= torch.cat(dropped).max()
    # true sizes: padding inside a layer is not counted
    per_dir = 2 * (40 + 1)
    assert parameter_count(model) - parameter_count(pruned) == sum(8 - r for r in ranks) * per_dir


def test_global_mode_can_empty_a_head(make_gpt2, tokens):
    model = make_gpt2("5x8")
    pruned = cc.prune(model, ratio=0.95, target="both", mode="global")
    ranks = [r for d in pruned.config.clover["ranks"].values() for p in d.values() for r in p]
    assert 0 in ranks
    assert torch.isfinite(logits(pruned, tokens)).all()


def test_threshold_mode_keeps_singular_values_above_it(make_gpt2):
    model = make_gpt2("3x16")
    dec = cc.decompose(model)
    t = dec.modules["transformer.h.0.attn"].pairs["vo"].s.median().item()
    pruned = cc.prune(dec, target="vo", mode="threshold", threshold=t)
    for name, d in pruned.config.clover["ranks"].items():
        assert d["vo"] == (dec.modules[name].pairs["vo"].s > t).sum(1).tolist()


def test_vanilla_and_clover_prune_to_the_same_size(make_gpt2):
    model = make_gpt2("5x8")
    dec = cc.decompose(model)
    for mode in ("uniform", "global"):
        a = cc.prune(dec, ratio=0.4, target="both", mode=mode, method="clover")
        b = cc.prune(dec, ratio=0.4, target="both", mode=mode, method="vanilla")
        assert parameter_count(a) == parameter_count(b)
        assert kv_cache_bytes_per_token(a) == kv_cache_bytes_per_token(b)


def test_pruned_attention_keeps_the_original_softmax_scale(make_gpt2):
    model = make_gpt2("2x32")  # scale_attn_by_inverse_layer_idx: the scale depends on the layer too
    pruned = cc.prune(model, ratio=0.75, target="qk")
    for i in range(2):
        assert pruned.transformer.h[i].attn.qk_dim == 8
        assert pruned.transformer.h[i].attn.scaling == model.transformer.h[i].attn.scaling == 32**-0.5 / (i + 1)


def test_reprune_from_a_cached_decomposition_runs_no_svd(make_gpt2, monkeypatch):
    dec = cc.decompose(make_gpt2("3x16"))

    def boom(*a, **k):
        raise AssertionError("an SVD/QR ran while re-pruning")

    for fn in ("svd", "qr", "svdvals", "eigh"):
        monkeypatch.setattr(torch.linalg, fn, boom)
    for ratio in (0.1, 0.5, 0.9):
        cc.prune(dec, ratio=ratio, target="both", mode="global")
        cc.prune(dec, ratio=ratio, target="both", method="vanilla")
    cc.spectra(dec)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_generate_with_cache_matches_greedy_full_forward(make_gpt2, attn, mode):
    model = make_gpt2("5x8", attn=attn)
    pruned = cc.prune(model, ratio=0.5, target="both", mode=mode)
    prompt = torch.tensor([[5, 17, 42, 8]])
    out = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(12):
        nxt = logits(pruned, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_kv_cache_really_shrinks(make_gpt2):
    model = make_gpt2("3x16")
    pruned = cc.prune(model, ratio=0.5, target="qk")
    out = pruned(torch.tensor([[1, 2, 3]]), use_cache=True)
    layer = output_cache(out).layers[0]
    assert layer.keys.shape[-1] == 8 and layer.values.shape[-1] == 16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=1.0), "ratio=1.0 is out of range"),
        (dict(ratio=-0.1), "out of range"),
        (dict(ratio=float("nan")), "ratio=nan"),
        (dict(ratio="0.5"), "ratio='0.5'"),
        (dict(ratio=True), "ratio=True"),
        (dict(ratio=0.5, target="kq"), "target='kq'"),
        (dict(ratio=0.5, method="svd"), "method='svd'"),
        (dict(ratio=0.5, mode="local"), "mode='local'"),
        (dict(mode="threshold"), "threshold=None"),
        (dict(mode="threshold", threshold=-1.0), "threshold=-1.0"),
        (dict(mode="threshold", threshold=0.1, ratio=0.5), "ratio=0.5 is not used"),
        (dict(ratio=0.5, threshold=0.1), "threshold=0.1 is only used"),
        (dict(), "ratio is required with mode='uniform'"),  # no silent unpruned copy
        (dict(mode="global"), "ratio is required with mode='global'"),
    ],
)
def test_bad_arguments_name_the_argument(make_gpt2, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cc.prune(make_gpt2(), **kwargs)


def test_the_slider_needs_a_ratio_too(make_gpt2):
    slider = cc.Slider(cc.decompose(make_gpt2()))
    with pytest.raises(ValueError, match="ratio is required with mode='uniform'"):
        slider()


def test_unsupported_models_and_dtypes_are_refused(make_gpt2):
    with pytest.raises(NotImplementedError, match="GPT2Attention"):
        cc.prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), ratio=0.5)
    with pytest.raises(TypeError, match="expected a torch model"):
        cc.prune("gpt2", ratio=0.5)
    model = make_gpt2()
    attn = model.transformer.h[0].attn
    attn.c_attn.weight = torch.nn.Parameter(attn.c_attn.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point"):
        cc.decompose(model)


def test_normalized_allocation_compares_layers_like_with_like(make_gpt2):
    """Scaling one layer's V-O weights moves the raw global threshold onto the other layers; the
    normalized allocation ranks each layer's directions relative to its own scale, so it does not move."""
    model, scaled = make_gpt2("5x8"), make_gpt2("5x8")
    with torch.no_grad():
        scaled.transformer.h[0].attn.c_proj.weight.mul_(100.0)  # layer 0's V-O products x 100

    def ranks(m, allocation):
        pruned = cc.prune(m, ratio=0.5, target="vo", mode="global", allocation=allocation)
        return {name: r["vo"] for name, r in pruned.config.clover["ranks"].items()}

    assert ranks(model, "normalized") == ranks(scaled, "normalized")
    slid = cc.Slider(cc.decompose(model))(0.5, target="vo", mode="global", allocation="normalized")
    assert {name: r["vo"] for name, r in slid.config.clover["ranks"].items()} == ranks(model, "normalized")
    assert ranks(model, "raw") != ranks(scaled, "raw")  # sensitivity: the raw ranking follows the scale
    assert (
        cc.prune(model, ratio=0.5, mode="global", allocation="normalized").config.clover["allocation"] == "normalized"
    )
    assert "allocation" not in cc.prune(model, ratio=0.5, mode="global").config.clover  # the paper's: as before
    with pytest.raises(ValueError, match="allocation='normalized' is only used with mode='global'"):
        cc.prune(model, ratio=0.5, allocation="normalized")
    with pytest.raises(ValueError, match="allocation='even' is not supported"):
        cc.prune(model, ratio=0.5, mode="global", allocation="even")
