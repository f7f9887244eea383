"""Metrics on hand-made cases with known answers."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clover_core import metrics


class UnigramLM(nn.Module):
    """A causal 'LM' whose next-token distribution is a fixed table: perplexity has a closed form."""

    def __init__(self, probs: torch.Tensor, positions: int = 64):
        super().__init__()
        self.logp = nn.Parameter(probs.log(), requires_grad=False)
        self.config = SimpleNamespace(n_positions=positions)
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = UnigramLM(torch.full((50,), 1 / 50))
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    assert metrics.perplexity(model, ids, window=64, stride=32, progress=False) == pytest.approx(50, rel=1e-6)


@pytest.mark.parametrize("window,stride", [(64, 64), (64, 32), (64, 1), (17, 5), (400, 400)])
def test_sliding_window_scores_each_token_once(window, stride):
    """Overlapping windows score every token but the first exactly once; non-overlapping windows (the
    transformers protocol with stride == window) also skip each window's first token, which has no context."""
    probs = torch.softmax(torch.randn(11, generator=torch.Generator().manual_seed(1)), 0)
    ids = torch.randint(0, 11, (203,), generator=torch.Generator().manual_seed(2))
    scored = [i for i in range(1, 203) if stride < window or i % window]
    expected = math.exp(-probs.log()[ids[scored]].double().mean().item())
    model = UnigramLM(probs, positions=512)
    got = metrics.perplexity(model, ids, window=window, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)


def test_perplexity_limits_and_bad_arguments():
    model = UnigramLM(torch.full((5,), 0.2))
    ids = torch.arange(5).repeat(40)
    metrics.perplexity(model, ids, window=8, stride=8, max_tokens=16, progress=False)
    assert model.calls == 2  # 16 tokens in windows of 8
    with pytest.raises(ValueError, match="stride"):
        metrics.perplexity(model, ids, window=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="exceeds this model's 64 positions"):
        metrics.perplexity(model, ids, window=128, stride=64, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        metrics.perplexity(model, ids[:1], progress=False)
    with pytest.raises(ValueError, match="1-D integer"):
        metrics.perplexity(model, torch.rand(10), progress=False)


def test_gpt2_perplexity_matches_the_loss_of_one_full_window(make_gpt2, tokens):
    """A window covering the whole text is exactly the model's own mean loss."""
    model = make_gpt2()
    ids = tokens[0]
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert metrics.perplexity(model, ids, window=64, stride=32, progress=False) == pytest.approx(
        math.exp(loss), rel=1e-5
    )


def test_word_error_rate_known_edits():
    # "sat"->"sit" (substitution), "the" before "mat" deleted, 6 reference words
    assert metrics.word_error_rate("The cat sat on the mat.", "the cat sit on mat") == pytest.approx(2 / 6)
    assert metrics.word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
    assert metrics.word_error_rate(["a b", "c d e f"], ["a b x", ""]) == pytest.approx((1 + 4) / 6)  # corpus-level
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        metrics.word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        metrics.word_error_rate([" ,. "], ["x"])


def test_normalize_transcript():
    assert metrics.normalize_transcript("  Hello, World!  It's   'quoted'. ") == "hello world it's quoted"


def test_psnr_known_values():
    ref = torch.zeros(3, 16, 16)
    assert metrics.psnr(ref, ref) == math.inf
    assert metrics.psnr(ref, ref + 0.1) == pytest.approx(20.0)  # mse 0.01 -> 10 log10(1 / 0.01)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(ref, torch.zeros(3, 8, 8))


def test_ssim_identical_different_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=gen)
    b = (a + 0.2 * torch.randn(3, 32, 32, generator=gen)).clamp(0, 1)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 < metrics.ssim(a, b) < 0.95
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    assert metrics.ssim(a, 1 - a) < 0  # anti-correlated structure
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        metrics.ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))


def test_teacher_forced_loss_matches_a_manual_cross_entropy(make_whisper):
    model = make_whisper()
    feats = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(0))
    inputs = torch.tensor([[1, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, 6, 7, 8, 2]])  # the first position is prompt, not scored
    with torch.no_grad():
        logits = model(input_features=feats, decoder_input_ids=inputs).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[1:], labels[0, 1:]).item()
    assert metrics.teacher_forced_loss(model, feats, labels, decoder_input_ids=inputs) == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(ValueError, match="no scored token"):
        metrics.teacher_forced_loss(model, feats, torch.full((1, 5), -100), decoder_input_ids=inputs)
