import pytest
import torch

import clover_core as cc
from clover_core.architectures.base import split_heads
from clover_core.orthogonalize import orthogonalize, vanilla_scores

from .helpers import gpt2_head_products
from .tolerances import FP32, FP32_FACTOR_REL, FP64


def factors(g=4, m=33, n=29, k=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(g, m, k, generator=gen, dtype=dtype), torch.randn(g, n, k, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.float64, FP64)])
def test_orthogonalize_is_exact_and_orthogonal(dtype, tol):
    a, b = factors(dtype=dtype)
    a2, b2, s = orthogonalize(a, b, dtype=dtype)
    torch.testing.assert_close(a2 @ b2.transpose(1, 2), a @ b.transpose(1, 2), **tol)
    # columns are orthogonal and ordered: a2.T a2 = b2.T b2 = diag(S)
    eye_s = torch.diag_embed(s).to(dtype)
    torch.testing.assert_close(a2.transpose(1, 2) @ a2, eye_s, **tol)
    torch.testing.assert_close(b2.transpose(1, 2) @ b2, eye_s, **tol)
    assert (s[:, :-1] >= s[:, 1:]).all()


def test_singular_values_match_the_full_product_svd():
    a, b = factors()
    _, _, s = orthogonalize(a, b)
    ref = torch.linalg.svdvals((a @ b.transpose(1, 2)).double())[:, : a.shape[2]]
    torch.testing.assert_close(s.double(), ref, **FP32)


def test_rotated_scores_are_the_singular_values():
    a, b = factors()
    a2, b2, s = orthogonalize(a, b)
    torch.testing.assert_close(vanilla_scores(a2, b2), s, **FP32)


def test_fewer_rows_than_head_dim_pads_with_zero_directions():
    a, b = factors(m=5, n=7, k=8)
    a2, b2, s = orthogonalize(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape
    assert (s[:, 5:] == 0).all()
    torch.testing.assert_close(a2 @ b2.transpose(1, 2), a @ b.transpose(1, 2), **FP32)


def test_truncation_is_the_optimal_low_rank_approximation():
    a, b = factors(k=16)
    a2, b2, s = orthogonalize(a, b)
    product = a @ b.transpose(1, 2)
    for r in (1, 4, 9):
        err = (a2[..., :r] @ b2[..., :r].transpose(1, 2) - product).norm(dim=(1, 2))
        eckart_young = s[:, r:].pow(2).sum(1).sqrt()
        torch.testing.assert_close(err, eckart_young, atol=FP32_FACTOR_REL * product.norm().item(), rtol=1e-4)


def test_non_float_and_mismatched_factors_are_refused():
    a, b = factors()
    with pytest.raises(TypeError, match="floating-point"):
        orthogonalize(a.to(torch.int8), b)
    with pytest.raises(ValueError, match="do not pair up"):
        orthogonalize(a, b[:, :, :4])
    with pytest.raises(TypeError, match="float64"):
        orthogonalize(a, b, dtype=torch.float16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])  # 1e30: its square overflows float32
def test_non_finite_factors_are_refused(bad):
    a, b = factors()
    b[2, 5, 3] = bad
    with pytest.raises(ValueError, match="factor b holds NaN or inf values"):
        orthogonalize(a, b)


def test_decompose_names_the_module_whose_weights_are_not_finite(make_gpt2):
    model = make_gpt2("3x16")
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^transformer\.h\.1\.attn: its V-O weights hold NaN or inf values"):
        cc.decompose(model)


def test_decompose_refuses_what_is_not_a_loaded_model(make_gpt2):
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got str 'gpt2'; load a model first"):
        cc.decompose("gpt2")
    with pytest.raises(ValueError, match=r"c_attn\.weight is on the meta device: the model has no weights loaded"):
        cc.decompose(make_gpt2("3x16").to("meta"))


def test_decompose_keeps_model_and_reports_spectra(make_gpt2):
    model = make_gpt2("3x16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dec = cc.decompose(model)
    spec = cc.spectra(dec)
    assert list(spec) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for pairs in spec.values():
        assert set(pairs) == {"qk", "vo"}
        for s in pairs.values():
            assert s.shape == (3, 16) and (s[:, :-1] >= s[:, 1:]).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spectra_from_a_model_equals_spectra_from_its_decomposition(make_gpt2):
    model = make_gpt2("5x8")
    a, b = cc.spectra(model), cc.spectra(cc.decompose(model))
    for name in a:
        torch.testing.assert_close(a[name]["vo"], b[name]["vo"])
        for pair, product in gpt2_head_products(model.get_submodule(name)).items():  # an independent oracle
            expected = torch.linalg.svdvals(product.double())[:, :8].float()
            torch.testing.assert_close(a[name][pair], expected, atol=FP32_FACTOR_REL * expected.max().item(), rtol=0)


def test_decompose_float64_path(make_gpt2):
    model = make_gpt2("5x8").double()
    dec = cc.decompose(model, dtype=torch.float64)
    pd = dec.modules["transformer.h.0.attn"].pairs["qk"]
    assert pd.a.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonalize_writes_into_strided_out(dtype):
    a, b = factors()
    a[1, :, 3:] = a[1, :, :3].sum(-1, keepdim=True)  # rank-deficient: group 1 takes the QR route
    storage = [torch.full((a.shape[2], a.shape[0], t.shape[1]), float("nan")) for t in (a, b)]
    out = tuple(s.permute(1, 2, 0) for s in storage)  # rank-major views, as in a FactorStack
    a2, b2, s2 = orthogonalize(a, b, dtype=dtype, out=out)
    assert a2.data_ptr() == out[0].data_ptr() and b2.data_ptr() == out[1].data_ptr()
    a1, b1, s1 = orthogonalize(a, b, dtype=dtype)  # the same GEMMs, only the output strides differ
    for x, y in ((a2, a1), (b2, b1), (s2, s1)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2[1] @ b2[1].T, a[1] @ b[1].T, **FP32)  # the QR route's group too
    assert not any(s.isnan().any() for s in storage)


def test_orthogonalize_refuses_an_unfit_out():
    a, b = factors()
    with pytest.raises(ValueError, match=r"out for factor b is \(4, 29, 4\)"):
        orthogonalize(a, b, out=(torch.empty_like(a), torch.empty(4, 29, 4)))
    with pytest.raises(ValueError, match="float64"):
        orthogonalize(a, b, out=(torch.empty_like(a, dtype=torch.float64), torch.empty_like(b)))
    with pytest.raises(ValueError, match="shares memory"):
        orthogonalize(a, b, out=(a, torch.empty_like(b)))
    with pytest.raises(TypeError, match="pair of tensors"):
        orthogonalize(a, b, out=torch.empty_like(a))


def tiny_model(kind, make_gpt2, make_llama, make_whisper):
    return {"gpt2": lambda: make_gpt2("5x8"), "llama": make_llama, "whisper": make_whisper}[kind]()


@pytest.mark.parametrize(
    "kind,dtype",
    [("gpt2", torch.float32), ("llama", torch.float32), ("whisper", torch.float32), ("gpt2", torch.float16)],
)
def test_rank_major_decompose_equals_the_converted_one(kind, dtype, make_gpt2, make_llama, make_whisper):
    model = tiny_model(kind, make_gpt2, make_llama, make_whisper).to(dtype)
    converted = cc.decompose(model)
    converted.use_rank_major()
    direct = cc.decompose(model, rank_major=True)
    assert [(st.pair, st.names) for st in direct.stacks] == [(st.pair, st.names) for st in converted.stacks]
    for st, ref in zip(direct.stacks, converted.stacks):
        for x, y in ((st.a, ref.a), (st.b, ref.b), (st.s, ref.s)):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        for layer, name in enumerate(st.names):  # every pair reads its stack's storage
            pd = direct.modules[name].pairs[st.pair]
            assert (pd.a.data_ptr(), pd.b.data_ptr()) == tuple(v.data_ptr() for v in st.views(layer))
            torch.testing.assert_close(pd.s, st.s[layer], rtol=0, atol=0)
    stacks = direct.stacks
    direct.use_rank_major()  # already rank-major: nothing to convert
    assert direct.stacks is stacks


@pytest.mark.parametrize("kind", ["gpt2", "llama", "whisper"])
def test_vanilla_scores_of_a_decomposition_are_the_column_norm_products(kind, make_gpt2, make_llama, make_whisper):
    model = tiny_model(kind, make_gpt2, make_llama, make_whisper)
    dec = cc.decompose(model)
    for name, md in dec.modules.items():
        for pair, (a, b) in md.adapter.factors(model.get_submodule(name)).items():
            vanilla = md.pairs[pair].vanilla
            assert vanilla.dtype == torch.float32
            torch.testing.assert_close(vanilla, vanilla_scores(a, b), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("rank_major", [False, True])
def test_split_heads_folds_the_bias_and_keeps_the_weight_layout(bias, layout, rank_major):
    d, n, k = 7, 3, 4
    linear = torch.nn.Linear(d, n * k, bias=bias)
    weight = linear.weight.detach().T if layout == "linear" else linear.weight.detach().T.contiguous()  # (d, n*k)
    folded = torch.cat([weight, linear.bias.detach()[None] if bias else torch.zeros(1, n * k)])
    expected = folded.view(d + 1, k, n).permute(2, 0, 1) if rank_major else folded.view(d + 1, n, k).permute(1, 0, 2)
    got = split_heads(weight, linear.bias if bias else None, n, rank_major=rank_major)
    assert torch.equal(got, expected)
    assert got.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()  # a copy, not a view
    assert (got.stride(1) == 1) == (layout == "linear")  # nn.Linear: each head's columns contiguous


# Reduced float32 matmul precision (TF32 on cuBLAS, bfloat16 in oneDNN): lifted while the engine runs.

SWITCHES = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
PRECISION_SETTINGS = {
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "oneDNN bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "cuBLAS tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
}


def precision_readings():
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to read it once the legacy and per-backend switches disagree
        legacy = "mixed"
    return legacy, [s.fp32_precision for s in SWITCHES]


@pytest.fixture
def reduced_precision():
    """Set one of PRECISION_SETTINGS; afterwards the defaults come back (legacy and per-backend)."""
    yield lambda name: PRECISION_SETTINGS[name]()
    torch.set_float32_matmul_precision("highest")
    for s in SWITCHES:
        s.fp32_precision = "none"


@pytest.mark.parametrize("setting", list(PRECISION_SETTINGS))
def test_reduced_matmul_precision_is_lifted_while_decomposing_and_restored(
    setting, reduced_precision, make_gpt2, monkeypatch
):
    engine = __import__("clover_core.orthogonalize", fromlist=["_gram"])
    model = make_gpt2("5x8")
    expected = cc.decompose(model)
    reduced_precision(setting)
    before = precision_readings()
    seen = []
    real_gram = engine._gram
    monkeypatch.setattr(engine, "_gram", lambda x: seen.append([s.fp32_precision for s in SWITCHES]) or real_gram(x))
    got = cc.decompose(model)
    assert seen and all(values == ["ieee", "ieee"] for values in seen)  # the GEMMs ran in full float32
    assert precision_readings() == before  # and the setting is back as it was
    for name, md in expected.modules.items():  # the same bits as at full precision
        for pair, pd in md.pairs.items():
            other = got.modules[name].pairs[pair]
            assert torch.equal(pd.s, other.s) and torch.equal(pd.a, other.a) and torch.equal(pd.b, other.b), name


def test_the_precision_switch_is_shared_and_untouched_by_default(reduced_precision, monkeypatch):
    from clover_core.orthogonalize import full_precision_matmuls

    def refuse(*args):
        raise AssertionError("the default precision was changed")

    with monkeypatch.context() as m:  # full precision already: nothing is written
        m.setattr(torch, "set_float32_matmul_precision", refuse)
        with full_precision_matmuls():
            assert precision_readings() == ("highest", ["none", "none"])
    reduced_precision("legacy high")
    with full_precision_matmuls():
        with full_precision_matmuls():
            pass
        assert precision_readings() == ("highest", ["ieee", "ieee"])  # the inner block left it on for the outer
    assert precision_readings() == ("high", ["tf32", "tf32"])
