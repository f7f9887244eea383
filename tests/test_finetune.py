import copy
import os

import pytest
import torch

import clover_core as cc
from clover_core.architectures import adapter_for
from clover_core.metrics import parameter_count

from .helpers import logits
from .tolerances import FP32, FP64


def train_step(ft, batch, lr=1e-2, **inputs):
    """One AdamW step on the language-model loss; returns the trained model's logits."""
    opt = torch.optim.AdamW(ft.parameters(), lr=lr, weight_decay=0.0)
    ft.model(**inputs, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        return ft.model(**inputs).logits


@pytest.mark.parametrize("shape", ["3x16", "5x8", "2x32"])
@pytest.mark.parametrize("target,mlp", [("qk", False), ("vo", False), ("both", False), ("both", True)])
def test_prepared_model_starts_as_the_original(make_gpt2, tokens, shape, target, mlp):
    model = make_gpt2(shape)
    before = logits(model, tokens)
    ft = cc.finetune.prepare(model, target, mlp=mlp, mlp_block=8)
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP32)


def test_float64_models_start_exactly(make_gpt2, tokens):
    model = make_gpt2("3x16").double()
    before = logits(model, tokens)
    ft = cc.finetune.prepare(model, "both", mlp=True, mlp_block=16)
    assert all(p.dtype == torch.float64 for p in ft.parameters())
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP64)


def test_only_the_singular_value_matrices_get_gradients(make_gpt2, tokens):
    model = make_gpt2("3x16")  # 2 layers, 3 heads of 16, MLP width 192
    ft = cc.finetune.prepare(model, "both", mlp=True, mlp_block=16)
    ft.model(tokens, labels=tokens).loss.backward()
    trainable = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in ft.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == with_grad and len(trainable) == 2 * 3  # (Q-K, V-O, up) per layer
    assert {tuple(p.shape) for p in ft.parameters()} == {(3, 16, 16), (12, 16, 16)}
    assert ft.trainable_parameters() == (2 * (2 * 3 * 16 * 16 + 12 * 16 * 16),) * 2 + (parameter_count(model) - 9216,)


def test_a_step_changes_outputs_and_merge_reproduces_them(make_gpt2, tokens):
    model = make_gpt2("3x16")
    original = copy.deepcopy(model)
    before = logits(model, tokens)
    ft = cc.finetune.prepare(model, "both")
    trained = train_step(ft, tokens, input_ids=tokens)
    assert (trained - before).abs().max() > 1e-2  # sensitivity: the equality checks below could fail
    merged = ft.merge()
    assert torch.equal(logits(merged, tokens), trained)
    assert parameter_count(merged) == parameter_count(original)
    assert merged.state_dict().keys() == original.state_dict().keys()
    assert [type(m) for m in merged.modules()] == [type(m) for m in original.modules()]
    assert all(p.requires_grad for p in merged.parameters())  # the flags the model came with
    with pytest.raises(RuntimeError, match="merged"):
        ft.merge()


def test_adapter_round_trip(make_gpt2, tokens, tmp_path):
    ft = cc.finetune.prepare(make_gpt2("5x8"), "both", mlp=True, mlp_block=8)
    trained = train_step(ft, tokens, input_ids=tokens)
    ft.save_adapter(tmp_path / "adapter.safetensors")
    assert (tmp_path / "adapter.safetensors").stat().st_size < 64 * 1024  # the matrices only
    again = cc.finetune.prepare(make_gpt2("5x8"), "both", mlp=True, mlp_block=8)
    torch.testing.assert_close(
        logits(again.load_adapter(tmp_path / "adapter.safetensors").model, tokens), trained, **FP32
    )
    with pytest.raises(ValueError, match="other base weights"):
        cc.finetune.prepare(make_gpt2("5x8", seed=1), "both", mlp=True, mlp_block=8).load_adapter(
            tmp_path / "adapter.safetensors"
        )
    with pytest.raises(ValueError, match="same settings"):
        cc.finetune.prepare(make_gpt2("5x8"), "vo").load_adapter(tmp_path / "adapter.safetensors")


def test_adapter_files_name_what_is_wrong(make_gpt2, tmp_path):
    ft = cc.finetune.prepare(make_gpt2("3x16"), "vo")
    old = os.umask(0o022)
    try:
        ft.save_adapter(tmp_path / "new" / "folder" / "adapter.safetensors")  # missing folders are made
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "folder" / "adapter.safetensors").stat().st_mode & 0o777 == 0o644  # not owner-only
    with pytest.raises(ValueError, match="is a folder; pass the adapter's file name"):
        ft.save_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a file; pass the file save_adapter"):
        ft.load_adapter(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="junk.safetensors cannot be read as safetensors"):
        ft.load_adapter(tmp_path / "junk.safetensors")


def test_pruned_model_recovers_at_its_pruned_size(make_gpt2, tokens, tmp_path):
    pruned = cc.prune(make_gpt2("3x16"), ratio=0.5, target="vo", mode="global")
    size, before = parameter_count(pruned), logits(pruned, tokens)
    ranks = {name: m.clover_ranks["vo"] for name, m in pruned.named_modules() if hasattr(m, "clover_ranks")}
    ft = cc.finetune.prepare(pruned, "both")
    trainable, allocated, _ = ft.trainable_parameters()
    assert trainable < allocated  # ragged ranks: the pruned directions are masked, not trained
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP32)
    trained = train_step(ft, tokens, input_ids=tokens)
    merged = ft.merge()
    assert parameter_count(merged) == size
    assert torch.equal(logits(merged, tokens), trained)
    for name, kept in ranks.items():  # padding stays zero: the stored ranks still describe the model
        module = merged.get_submodule(name)
        a, b = adapter_for(module).factors(module)["vo"]
        for g, r in enumerate(kept):
            assert not a[g, :, r:].any() and not b[g, :, r:].any()
    cc.save_pruned(merged, tmp_path / "recovered")  # still a valid CLOVER checkpoint
    assert torch.equal(logits(cc.load_pruned(tmp_path / "recovered"), tokens), trained)


def test_llama_key_side_variant(make_llama, tokens):
    model = make_llama(bias=True)  # 6 query heads, 2 KV heads of 8
    size, before = parameter_count(model), logits(model, tokens)
    ft = cc.finetune.prepare(model, "both", mlp=True, mlp_block=16)
    assert sorted({name.rsplit(".", 1)[1] for name in ft.cores}) == ["k", "up", "vo"]
    key = ft.cores["model.layers.0.self_attn.k"]
    assert key.weight.shape == (2, 8, 8)
    assert torch.equal(key.weight, key.weight.triu())  # R of the QR, upper triangular at the start
    assert torch.allclose(key.basis.transpose(1, 2) @ key.basis, torch.eye(8).expand(2, 8, 8), atol=1e-5)
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP32)
    trained = train_step(ft, tokens, input_ids=tokens)
    assert (trained - before).abs().max() > 1e-2
    merged = ft.merge()
    assert parameter_count(merged) == size and torch.equal(logits(merged, tokens), trained)


def test_llama_pruned_vo_then_key_side(make_llama, tokens):
    pruned = cc.prune(make_llama(), ratio=0.5, target="vo", mode="global")
    before = logits(pruned, tokens)
    ft = cc.finetune.prepare(pruned, "both")
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP32)
    trained = train_step(ft, tokens, input_ids=tokens)
    assert torch.equal(logits(ft.merge(), tokens), trained)


def test_whisper_self_and_cross_attention(make_whisper):
    model = make_whisper()
    size = parameter_count(model)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_features": torch.randn(2, 8, 40, generator=gen),
        "decoder_input_ids": torch.randint(3, 100, (2, 6), generator=gen),
    }
    with torch.no_grad():
        before = model(**inputs).logits
    ft = cc.finetune.prepare(model, "both", mlp=True, mlp_block=16)
    assert any("encoder_attn" in name for name in ft.cores)  # cross-attention is trained too
    with torch.no_grad():
        torch.testing.assert_close(ft.model(**inputs).logits, before, **FP32)
    trained = train_step(ft, inputs["decoder_input_ids"], **inputs)
    assert (trained - before).abs().max() > 1e-2
    merged = ft.merge()
    with torch.no_grad():
        assert torch.equal(merged(**inputs).logits, trained)
    assert parameter_count(merged) == size


def test_bfloat16_stays_bfloat16(make_gpt2, tokens):
    ft = cc.finetune.prepare(make_gpt2("3x16").to(torch.bfloat16), "both")
    assert all(p.dtype == torch.bfloat16 for p in ft.parameters())
    trained = train_step(ft, tokens, input_ids=tokens)
    merged = ft.merge()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert torch.equal(logits(merged, tokens), trained)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA runs wherever there is one


@pytest.mark.parametrize("device", DEVICES)
def test_on_each_device(make_gpt2, tokens, device):
    model, tokens = make_gpt2("3x16").to(device), tokens.to(device)
    before = logits(model, tokens)
    ft = cc.finetune.prepare(model, "both")
    assert all(p.device.type == device for p in ft.parameters())
    torch.testing.assert_close(logits(ft.model, tokens), before, **FP32)
    trained = train_step(ft, tokens, input_ids=tokens)
    assert torch.equal(logits(ft.merge(), tokens), trained)


def test_clear_errors(make_gpt2, make_unet):
    with pytest.raises(ValueError, match="target='qv'"):
        cc.finetune.prepare(make_gpt2(), "qv")
    with pytest.raises(ValueError, match="mlp_block=0"):
        cc.finetune.prepare(make_gpt2(), mlp=True, mlp_block=0)
    model, ids = make_gpt2(), torch.arange(1, 9)[None]
    before = logits(model, ids)
    with pytest.raises(ValueError, match="multiple of mlp_block=50"):
        cc.finetune.prepare(model, mlp=True, mlp_block=50)
    assert torch.equal(logits(model, ids), before)  # a refused model is left exactly as it was
    assert all(p.requires_grad for p in model.parameters())
    ft = cc.finetune.prepare(make_gpt2())
    with pytest.raises(ValueError, match="already has parametrizations"):
        cc.finetune.prepare(ft.model)
    with pytest.raises(NotImplementedError, match="no known MLP block"):
        cc.finetune.prepare(make_unet(), mlp=True)
