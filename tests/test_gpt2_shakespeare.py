"""The project's own GPT-2 (``gpt2-shakespeare``): shipped as it should be, and a real language model.

Its perplexity on a held-out play is compared with a unigram model's, fitted in this test on the two
other held-out plays (add-one smoothing over the tokenizer's vocabulary): a model that learned
nothing beyond word frequencies cannot beat that baseline by much.
"""

import json
import math
from collections import Counter

import pytest
import torch
from safetensors import safe_open

import clover_core as cc
from clover_core.data import bundled_text
from clover_core.metrics import perplexity
from clover_core.models import load_model
from clover_core.zoo import GPT2_SHAKESPEARE

pytestmark = [pytest.mark.real_weights]

TOKENS = 2048


@pytest.fixture(scope="module")
def bundle():
    return load_model("gpt2-shakespeare")


def test_shipped_as_float16_safetensors_under_30_mb():
    path = GPT2_SHAKESPEARE / "model.safetensors"
    assert path.stat().st_size < 30e6
    with safe_open(path, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    info = json.loads((GPT2_SHAKESPEARE / "training.json").read_text())
    assert set(info["heldout_plays"]).isdisjoint({info["validation_play"]})
    assert info["heldout_perplexity"] < info["unigram_heldout_perplexity"]


def test_gpt2_structure_with_heads_of_64(bundle):
    cfg = bundle.model.config
    assert cfg.model_type == "gpt2" and cfg.n_embd // cfg.n_head == 64


def test_beats_a_unigram_model_on_a_heldout_play(bundle):
    tok = bundle.processor
    ids = lambda name: tok(bundled_text(name), add_special_tokens=False)["input_ids"]  # noqa: E731
    counts = Counter(ids("macbeth") + ids("tempest"))
    total, vocab = sum(counts.values()), len(tok)
    hamlet = ids("hamlet")[:TOKENS]
    unigram_nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in hamlet[1:]) / (len(hamlet) - 1)
    unigram_ppl = math.exp(unigram_nll)
    ppl = perplexity(bundle.model, torch.tensor(hamlet), window=256, stride=128)
    assert ppl < 0.5 * unigram_ppl, (ppl, unigram_ppl)


def test_prunes_exactly_at_ratio_zero_and_generates(bundle):
    model = bundle.model.eval()
    x = torch.tensor([bundle.processor("To be, or not to be:")["input_ids"]])
    pruned = cc.prune(model, ratio=0.0, target="both", mode="global")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
        out = pruned.generate(x, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, x.shape[1] + 8)
