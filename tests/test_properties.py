"""Property tests: on random shapes, head counts, ranks, with and without biases, in float32 and
float64, the decomposition is exact and CLOVER's pruning is the optimal rank-r approximation."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import clover_core as cc
from clover_core.architectures import adapter_for
from clover_core.orthogonalize import orthogonalize

from .tolerances import FP32, FP32_FACTOR_REL, FP64

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = {torch.float32: FP32_FACTOR_REL * 10, torch.float64: FP64["rtol"]}  # fp32: QR + SVD of O(1) entries


@st.composite
def factor_pairs(draw):
    """Random batched factors ``(G, m, k)``, ``(G, n, k)``, m and n possibly below k, in a random dtype."""
    g, k = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    m, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a, b = torch.randn(g, m, k, generator=gen, dtype=dtype), torch.randn(g, n, k, generator=gen, dtype=dtype)
    if draw(st.booleans()):  # rank-deficient heads happen in trained models
        a[..., -1] = 0
    return a, b


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


@SETTINGS
@given(factor_pairs())
def test_orthogonalize_is_exact_and_orthogonal(pair):
    a, b = pair
    a_rot, b_rot, s = orthogonalize(a, b, dtype=a.dtype)
    product = a @ b.transpose(1, 2)
    assert rel_err(a_rot @ b_rot.transpose(1, 2), product) < REL[a.dtype]
    assert (s[:, :-1] >= s[:, 1:] - 1e-6 * s[:, :1]).all()  # descending
    gram = a_rot.transpose(1, 2) @ a_rot  # (G, k, k): diag(S) for U sqrt(S)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert off.abs().max() <= REL[a.dtype] * 10 * max(1.0, s.max().item())


@SETTINGS
@given(factor_pairs(), st.data())
def test_truncation_is_the_optimal_rank_r_approximation(pair, data):
    """Eckart-Young: keeping the top r columns leaves exactly the dropped singular values as error."""
    a, b = pair
    k = a.shape[-1]
    r = data.draw(st.integers(0, k))
    a_rot, b_rot, s = orthogonalize(a, b, dtype=a.dtype)
    approx = a_rot[..., :r] @ b_rot[..., :r].transpose(1, 2)
    err = (a @ b.transpose(1, 2) - approx).norm(dim=(1, 2))
    optimal = s[:, r:].norm(dim=1)
    torch.testing.assert_close(err, optimal, atol=REL[a.dtype] * 10 * max(1.0, s.max().item()), rtol=1e-3)


@st.composite
def gpt2_models(draw):
    heads, head_dim = draw(st.integers(1, 4)), draw(st.sampled_from([2, 4, 8]))
    config = GPT2Config(
        vocab_size=31,
        n_positions=16,
        n_layer=draw(st.integers(1, 2)),
        n_head=heads,
        n_embd=heads * head_dim,
        attn_implementation="eager",
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = GPT2LMHeadModel(config).eval()
    biases = draw(st.booleans())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.bias") or name.endswith("proj.bias"):
                p.normal_(0, 0.5) if biases else p.zero_()
    return model.to(draw(st.sampled_from([torch.float32, torch.float64])))


@pytest.mark.slow
@SETTINGS
@given(gpt2_models(), st.sampled_from(["qk", "vo"]), st.floats(0.0, 0.95), st.sampled_from(["uniform", "global"]))
def test_pruned_heads_are_optimal_for_their_kept_rank(model, target, ratio, mode):
    """Every pruned head's product equals the original head's best approximation at its true rank."""
    pruned = cc.prune(model, ratio=ratio, target=target, mode=mode)
    tol = REL[torch.float32] * 10  # prune() decomposes in float32 whatever the model's dtype
    for name, module in model.named_modules():
        if not name.endswith("attn") or not hasattr(module, "c_attn"):
            continue
        new = pruned.get_submodule(name)
        a, b = adapter_for(module).factors(module)[target]
        a2, b2 = adapter_for(new).factors(new)[target]
        ranks = new.clover_ranks[target]
        _, _, s = orthogonalize(a, b, dtype=torch.float64)
        err = (a.double() @ b.double().transpose(1, 2) - a2.double() @ b2.double().transpose(1, 2)).norm(dim=(1, 2))
        optimal = torch.stack([s[h, r:].norm() for h, r in enumerate(ranks)])
        scale = max(1.0, s.max().item())
        torch.testing.assert_close(err, optimal, atol=tol * scale, rtol=1e-3)


@pytest.mark.slow
@SETTINGS
@given(gpt2_models())
def test_ratio_zero_is_exact_on_every_draw(model):
    ids = torch.randint(0, 31, (1, 9), generator=torch.Generator().manual_seed(0))
    pruned = cc.prune(model, ratio=0.0, target="both")
    tol = FP32  # prune() decomposes in float32 whatever the model's dtype
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, **tol)
