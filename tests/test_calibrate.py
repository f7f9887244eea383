"""Calibrated (data-aware) decomposition: exact at full rank on every family, optimal for the error on
the calibration data, vanilla scored by the activations, and bad input refused."""

import pytest
import torch

import clover_core as cc

from .conftest import unet_inputs
from .helpers import gpt2_head_products, logits
from .tolerances import CALIBRATED_REL, FP32, NORM_FOLD_REL

TOKENS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(7))
FEATS = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(3))
DEC_IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35]])


def lm_batches(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (1, 32), generator=gen)} for _ in range(2)]


def unet_batches():  # three prompts of 7 text tokens: 21 rows for the cross-attention keys, at least 16
    batches = []
    for seed in (5, 6, 7):
        x, t, enc, added = unet_inputs(seed)
        batches.append({"sample": x, "timestep": t, "encoder_hidden_states": enc, "added_cond_kwargs": added})
    return batches


FAMILIES = {  # fixture, calibration batches, output, targets
    "gpt2": ("make_gpt2", lambda: lm_batches(97), lambda m: logits(m, TOKENS), ["qk", "vo", "both"]),
    "whisper": (
        "make_whisper",
        lambda: [{"input_features": FEATS, "decoder_input_ids": DEC_IDS}],
        lambda m: m(input_features=FEATS, decoder_input_ids=DEC_IDS[:, :5]).logits,
        ["qk", "vo", "both"],
    ),
    "llama": ("make_llama", lambda: lm_batches(100), lambda m: logits(m, TOKENS), ["vo"]),
    "unet": (
        "make_unet",
        unet_batches,
        lambda m: m(*unet_inputs()[:3], added_cond_kwargs=unet_inputs()[3]).sample,
        ["qk", "vo", "both"],
    ),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    fixture, batches, out, targets = FAMILIES[request.param]
    model = request.getfixturevalue(fixture)()
    return model, cc.calibrate(model, batches(), source="random test inputs"), out, targets


@torch.no_grad()
def test_calibrated_ratio_zero_is_exact_and_a_ratio_changes_outputs(family):
    model, stats, out, targets = family
    ref = out(model)
    dec = cc.decompose(model, calibration=stats)
    for target in targets:
        for method in ("clover", "vanilla"):
            torch.testing.assert_close(out(cc.prune(dec, ratio=0.0, target=target, method=method)), ref, **FP32)
    calibrated = out(cc.prune(dec, ratio=0.5, target=targets[-1]))
    data_free = out(cc.prune(model, ratio=0.5, target=targets[-1]))
    assert (calibrated - ref).abs().max() > 1e-3  # a ratio changes the outputs ...
    assert (calibrated - data_free).abs().max() > 1e-4  # ... and the statistics change which directions stay


def _whitening(stats, key):
    """The damped Cholesky factor of one projection's covariance, computed here, not by the engine."""
    c = stats.covariances[key]
    damped = c + stats.damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.cholesky(damped)


@pytest.mark.parametrize("pair", ["qk", "vo"])
def test_calibrated_clover_is_optimal_for_the_error_on_the_data(make_gpt2, pair):
    model = make_gpt2("3x16")
    stats = cc.calibrate(model, lm_batches(97))
    name = "transformer.h.1.attn"
    lw = _whitening(stats, f"{name}.c_attn").T  # L^T, (d + 1, d + 1)
    right = lw.T if pair == "qk" else torch.eye(48, dtype=torch.float64)  # keys see the same inputs; outputs: none
    full = gpt2_head_products(model.get_submodule(name))[pair].double()
    white = lw @ full @ right  # what the data sees of each head's product
    s = torch.linalg.svdvals(white)  # (heads, 16): the oracle
    for r in (4, 8, 12):
        ratio = 1 - r / 16
        for method, worse in (("clover", False), ("vanilla", True)):
            pruned = cc.prune(model, ratio=ratio, target=pair, method=method, calibration=stats)
            kept = gpt2_head_products(pruned.get_submodule(name))[pair].double()
            err = (lw @ (full - kept) @ right).norm(dim=(1, 2))
            best = s[:, r:].norm(dim=1)
            if worse:
                assert (err >= best * (1 - 1e-6)).all() and (err > best * 1.01).any()
            else:
                torch.testing.assert_close(err, best, rtol=CALIBRATED_REL, atol=1e-6 * s.max().item())


def test_calibrated_vanilla_scores_weigh_each_dimension_by_its_activations(make_gpt2):
    model = make_gpt2("3x16")
    stats = cc.calibrate(model, lm_batches(97))
    name = "transformer.h.0.attn"
    md = cc.decompose(model, calibration=stats).modules[name]
    lw = _whitening(stats, f"{name}.c_attn").T
    attn = model.get_submodule(name)
    rows = torch.cat([attn.c_attn.weight, attn.c_attn.bias[None]]).detach().double()  # (d + 1, 3d)
    v = rows[:, 96:].reshape(49, 3, 16).transpose(0, 1)  # (heads, d + 1, 16)
    o = attn.c_proj.weight.detach().double().reshape(3, 16, 48)  # (heads, 16, d)
    expected = (lw @ v).norm(dim=1) * o.norm(dim=2)  # ||L^T a_i|| * ||b_i||
    torch.testing.assert_close(md.pairs["vo"].vanilla.double(), expected, rtol=1e-5, atol=0)
    data_free = cc.decompose(model).modules[name].pairs["vo"].vanilla
    assert not torch.allclose(md.pairs["vo"].vanilla, data_free, rtol=1e-2)


def test_the_slider_and_a_saved_checkpoint_keep_the_calibration(make_gpt2, tmp_path):
    model = make_gpt2("3x16")
    stats = cc.calibrate(model, lm_batches(97), source="two random batches")
    dec = cc.decompose(model, calibration=stats, rank_major=True)
    pruned = cc.prune(dec, ratio=0.5, target="both", mode="global")
    slid = cc.Slider(dec)(0.5, target="both", mode="global")
    torch.testing.assert_close(logits(slid, TOKENS), logits(pruned, TOKENS), **FP32)
    record = pruned.config.clover["calibration"]
    assert record == {"statistic": "input covariance", "data": "two random batches", "tokens": 64, "damp": 1e-2}
    assert slid.config.clover["calibration"] == record
    again = cc.load_pruned(cc.save_pruned(pruned, tmp_path / "ckpt"))
    assert again.config.clover["calibration"] == record
    assert "two random batches" in (tmp_path / "ckpt" / "README.md").read_text()
    torch.testing.assert_close(logits(again, TOKENS), logits(pruned, TOKENS), **FP32)
    assert "calibration" not in cc.prune(model, ratio=0.5).config.clover  # data-free: as before


def test_text_batches_cut_a_text_into_windows():
    from clover_core.zoo.packages import gpt2_tokenizer

    batches = cc.text_batches(
        gpt2_tokenizer(), "The quick brown fox jumps over the lazy dog. " * 40, tokens=100, length=32
    )
    assert [b["input_ids"].shape for b in batches] == [(1, 32), (1, 32), (1, 32), (1, 4)]
    with pytest.raises(ValueError, match="the calibration text has 2 tokens; at least 16"):
        cc.text_batches(gpt2_tokenizer(), "Hello world")
    with pytest.raises(ValueError, match="no tokenizer"):
        cc.text_batches(None, "text")


def test_bad_calibration_input_is_named(make_gpt2, make_llama):
    model = make_gpt2("3x16")
    with pytest.raises(ValueError, match="batches is empty"):
        cc.calibrate(model, [])
    with pytest.raises(ValueError, match="must be a dict of the model's keyword inputs"):
        cc.calibrate(model, [TOKENS])
    with pytest.raises(ValueError, match="only 4 calibration tokens reached"):
        cc.calibrate(model, [{"input_ids": TOKENS[:1, :4]}])
    with pytest.raises(ValueError, match="damp=0 must be a positive number"):
        cc.calibrate(model, lm_batches(97), damp=0)
    other = cc.calibrate(make_llama(), lm_batches(100))
    with pytest.raises(ValueError, match="statistics of another model"):
        cc.decompose(model, calibration=other)
    with pytest.raises(TypeError, match="must come from clover_core.calibrate"):
        cc.decompose(model, calibration={"c": 1})
    stats = cc.calibrate(model, lm_batches(97))
    with pytest.raises(ValueError, match="calibration= goes with a model"):
        cc.prune(cc.decompose(model), ratio=0.5, calibration=stats)
    broken = make_gpt2("3x16")
    with torch.no_grad():
        broken.transformer.wte.weight[5] = float("nan")
    with pytest.raises(ValueError, match="received NaN or inf activations"):
        cc.calibrate(broken, [{"input_ids": torch.full((1, 20), 5)}])


@pytest.mark.real_weights
@pytest.mark.slow
def test_calibrated_whisper_tiny_en_keeps_its_transcripts_with_a_quarter_of_qk_removed():
    """Calibrated on the bundled non-English clips, never on the English clips it is judged on."""
    from clover_core.audio import bundled_clips, calibration_clips, speech_batches, transcribe
    from clover_core.metrics import word_error_rate

    bundle = cc.load_model("whisper-tiny.en")
    model, processor = bundle.model, bundle.processor
    clips = bundled_clips()
    assert not {p.name for p in calibration_clips()} & {w.name for w, _ in clips.values()}
    stats = cc.calibrate(model, speech_batches(model, processor, calibration_clips()), source="non-English clips")

    def wer(m):
        return word_error_rate(
            [ref for _, ref in clips.values()], [transcribe(m, processor, str(w)) for w, _ in clips.values()]
        )

    original = wer(model)  # 0.476: "counting" comes out in digits, against a reference in words
    assert wer(cc.prune(model, ratio=0.25, target="qk", calibration=stats)) == original
    assert wer(cc.prune(model, ratio=0.25, target="qk")) > 2 * original  # data-free: far worse


def test_broken_statistics_and_silent_clips_are_named(make_whisper, tmp_path):
    import numpy as np
    import soundfile as sf

    from clover_core.audio import speech_batches

    inputs = {"m": {"vo": ("m.v", None)}}
    negative = cc.CalibrationStats({"m.v": -torch.eye(3, dtype=torch.float64)}, {"m.v": 99}, inputs)
    with pytest.raises(ValueError, match="covariance of m.v is not positive definite even with damp=0.01"):
        negative.whitening("m", "vo")
    nan = cc.CalibrationStats({"m.v": torch.full((3, 3), float("nan"), dtype=torch.float64)}, {"m.v": 99}, inputs)
    with pytest.raises(ValueError, match="statistics of m.v hold NaN or inf"):
        nan.whitening("m", "vo")
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="quiet.wav is silent"):
        speech_batches(make_whisper(), None, [tmp_path / "quiet.wav"])
    with pytest.raises(ValueError, match="no calibration clips"):
        speech_batches(make_whisper(), None, [])


@torch.no_grad()
def test_folded_norms_are_exact_at_full_rank_on_every_family(family):
    model, _, out, targets = family
    dec = cc.decompose(model, calibration=cc.norm_statistics(model))
    for target in targets:
        torch.testing.assert_close(out(cc.prune(dec, ratio=0.0, target=target)), out(model), **FP32)
    assert cc.prune(dec, ratio=0.5, target=targets[-1]).config.clover["calibration"]["statistic"] == "norm gains"


def test_folded_norms_make_clover_optimal_for_the_normalized_inputs(make_gpt2):
    """The exact rewrite: with LayerNorm's output ``g * x + beta``, CLOVER keeps the best directions of
    ``M P`` (``M`` the gain and bias as a matrix) for white normalized inputs ``x``."""
    model = make_gpt2("3x16")
    name = "transformer.h.1.attn"
    with torch.no_grad():  # a gain far from one, so folding it matters
        model.transformer.h[1].ln_1.weight.copy_(torch.linspace(0.1, 3.0, 48))
        model.transformer.h[1].ln_1.bias.normal_(0, 0.3)
    ln = model.transformer.h[1].ln_1
    m = torch.eye(49, dtype=torch.float64)
    m[:48, :48] = torch.diag(ln.weight.detach().double())
    m[48, :48] = ln.bias.detach().double()
    full = gpt2_head_products(model.get_submodule(name))["vo"].double()
    s = torch.linalg.svdvals(m @ full)  # the oracle, built here from the norm's own parameters
    pruned = cc.prune(model, ratio=0.5, target="vo", calibration=cc.norm_statistics(model))
    err = (m @ (full - gpt2_head_products(pruned.get_submodule(name))["vo"].double())).norm(dim=(1, 2))
    torch.testing.assert_close(err, s[:, 8:].norm(dim=1), rtol=NORM_FOLD_REL, atol=1e-6 * s.max().item())
    data_free = cc.prune(model, ratio=0.5, target="vo")
    err_free = (m @ (full - gpt2_head_products(data_free.get_submodule(name))["vo"].double())).norm(dim=(1, 2))
    assert (err_free > err * 1.01).any()  # the data-free choice is worse for that error
