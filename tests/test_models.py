"""The offline models' loaders: each tokenizer encodes text its model can read."""

import pytest
import torch

import clover_core as cc
from clover_core.models import gpt2_tokenizer


@pytest.mark.parametrize("name", ["gpt2-tiny-random", "gpt2-shakespeare", "smollm2-135m"])
def test_tokenized_text_runs_through_the_model(name):
    bundle = cc.load_model(name)
    ids = bundle.processor("Hello world, said the player.", return_tensors="pt").input_ids
    assert int(ids.max()) < bundle.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        assert torch.isfinite(bundle.model(ids).logits).all()


def test_the_gpt2_tokenizer_gives_gpt2_ids():
    """Read from Whisper's file, without Whisper's special tokens or the template adding them."""
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer("<|endoftext|>").input_ids == [tokenizer.eos_token_id] == [50256]
    assert tokenizer.decode([15496, 995]) == "Hello world"
