"""The model loaders: each offline tokenizer encodes text its model can read, and a diffusers model
saved on its own loads from its folder."""

import json

import pytest
import torch

import clover_core as cc
from clover_core.__main__ import main
from clover_core.zoo.packages import gpt2_tokenizer
from studio import cache as model_cache

from .conftest import unet_inputs
from .tolerances import FP32


@pytest.mark.real_weights
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
    args = [
        "prune",
        "--model",
        str(tmp_path / "unet"),
        "--ratio",
        "0.5",
        "--target",
        "both",
        "--out",
        str(tmp_path / "p"),
    ]
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
    cache = model_cache.ModelCache(2**30, loaders={"bare-unet": lambda: (make_unet(), None)})
    with pytest.raises(ValueError, match="bare-unet is a diffusers UNet2DConditionModel without its pipeline"):
        cache.get("bare-unet")


@pytest.mark.parametrize("name", ["os", "DiffusionPipeline", 3])
def test_a_folder_naming_no_diffusers_model_class_is_refused(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(ValueError, match=f"names _class_name={name!r}, which is not a diffusers model class"):
        cc.load_model(tmp_path)


@pytest.mark.slow
def test_variant_weights_load_like_plain_ones(make_unet, make_gpt2, tmp_path):
    """Folders saved with ``variant="fp16"`` (SDXL's UNet downloaded that way holds only
    ``diffusion_pytorch_model.fp16.safetensors``): a UNet in one file or sharded, a pipeline whose UNet
    has only variant weights, and a transformers model."""
    unet = make_unet().half()
    unet.save_pretrained(tmp_path / "plain")
    unet.save_pretrained(tmp_path / "one", variant="fp16")
    unet.save_pretrained(tmp_path / "shards", variant="fp16", max_shard_size="40KB")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    expected = cc.load_model(tmp_path / "plain").model.state_dict()
    for folder in ("one", "shards"):
        got = cc.load_model(tmp_path / folder).model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), folder
    pipe = cc.zoo.sdxl_tiny_random()[1]
    pipe.save_pretrained(tmp_path / "pipe")
    for path in (tmp_path / "pipe" / "unet").glob("*.safetensors"):
        path.unlink()
    unet.save_pretrained(tmp_path / "pipe" / "unet", variant="fp16")
    bundle = cc.load_model(tmp_path / "pipe")  # a pipeline loads in float32
    assert bundle.processor.unet is bundle.model
    got = bundle.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k].float()) for k in expected)
    gpt2 = make_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2", variant="fp16")
    assert (tmp_path / "gpt2" / "model.fp16.safetensors").is_file()
    loaded = cc.load_model(tmp_path / "gpt2").model
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, gpt2.transformer.h[0].attn.c_attn.weight)


def test_several_variants_and_no_plain_weights_are_refused(make_unet, tmp_path, capsys):
    unet = make_unet()
    for variant in ("fp16", "bf16"):
        unet.save_pretrained(tmp_path / "unet", variant=variant)
    message = "holds the weight variants bf16, fp16 and no plain weights"
    with pytest.raises(ValueError, match=message):
        cc.load_model(tmp_path / "unet")
    assert main(["prune", "--model", str(tmp_path / "unet"), "--ratio", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
