"""The model loaders: each offline tokenizer encodes text its model can read, and a diffusers model
saved on its own loads from its folder."""

import json

import pytest
import torch

import clover_core as cc
from clover_core import session as cs
from clover_core.__main__ import main
from clover_core.models import gpt2_tokenizer

from .conftest import unet_inputs
from .tolerances import FP32


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


def test_a_diffusers_model_folder_loads_and_prunes_from_the_cli(make_unet, tmp_path, capsys):
    """A pipeline's ``unet/`` saved on its own (``config.json`` naming its class, no ``model_type``)."""
    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    bundle = cc.load_model(tmp_path / "unet")
    assert type(bundle.model).__name__ == "UNet2DConditionModel" and bundle.processor is None
    args = ["prune", "--model", str(tmp_path / "unet"), "--ratio", "0.5", "--target", "both", "--out", str(tmp_path / "p")]
    assert main(args) == 0
    sample, t, text, added = unet_inputs()
    with torch.no_grad():
        got = cc.load_pruned(tmp_path / "p")(sample, t, text, added_cond_kwargs=added).sample
        expected = cc.prune(unet, ratio=0.5, target="both")(sample, t, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, expected, **FP32)
    capsys.readouterr()
    assert main(["demo", "--model", str(tmp_path / "unet")]) == 2  # no text: refused before decomposing
    assert "is a diffusion model; demo scores WikiText-2 perplexity" in capsys.readouterr().err


def test_the_app_refuses_a_unet_without_its_pipeline(make_unet):
    cache = cs.ModelCache(2**30, loaders={"bare-unet": lambda: (make_unet(), None)})
    with pytest.raises(ValueError, match="bare-unet is a diffusers UNet2DConditionModel without its pipeline"):
        cache.get("bare-unet")


@pytest.mark.parametrize("name", ["os", "DiffusionPipeline", 3])
def test_a_folder_naming_no_diffusers_model_class_is_refused(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(ValueError, match=f"names _class_name={name!r}, which is not a diffusers model class"):
        cc.load_model(tmp_path)
