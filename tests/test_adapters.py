"""Whisper, Llama (GQA + RoPE) and the SDXL UNet, with the same oracles as GPT-2."""

import pytest
import torch

import clover_core as cc
from clover_core.architectures import adapter_for
from clover_core.metrics import kv_cache_bytes_per_token, output_cache, parameter_count

from .conftest import unet_inputs
from .tolerances import FP32

FEATS = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(3))
DEC_IDS = torch.tensor([[1, 5, 7, 9, 11]])
LM_IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(4))


def whisper_out(model):
    with torch.no_grad():
        return model(input_features=FEATS, decoder_input_ids=DEC_IDS).logits


def llama_out(model):
    with torch.no_grad():
        return model(LM_IDS).logits


def unet_out(model):
    x, t, enc, added = unet_inputs()
    with torch.no_grad():
        return model(x, t, enc, added_cond_kwargs=added).sample


FAMILIES = {  # fixture, output, targets
    "whisper": ("make_whisper", whisper_out, ["qk", "vo", "both"]),
    "llama": ("make_llama", llama_out, ["vo"]),
    "unet": ("make_unet", unet_out, ["qk", "vo", "both"]),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    fixture, out, targets = FAMILIES[request.param]
    return request.param, request.getfixturevalue(fixture)(), out, targets


def test_ratio_zero_is_exact_and_a_ratio_changes_outputs(family):
    name, model, out, targets = family
    ref = out(model)
    for target in targets:
        for method in ("clover", "vanilla"):
            for mode in ("uniform", "global"):
                torch.testing.assert_close(
                    out(cc.prune(model, ratio=0.0, target=target, method=method, mode=mode)), ref, **FP32
                )
    assert (out(cc.prune(model, ratio=0.5, target=targets[-1])) - ref).abs().max() > 1e-3


def test_kept_directions_are_the_optimal_rank_r_per_head(family):
    name, model, out, targets = family
    pair = "vo"
    pruned = cc.prune(model, ratio=0.5, target=pair)
    vanilla = cc.prune(model, ratio=0.5, target=pair, method="vanilla")
    for mod_name, module, adapter in cc.architectures.attention_modules(model):
        a, b = adapter.factors(module)[pair]
        full = (a @ b.transpose(1, 2)).double()
        k = a.shape[2]
        r = round(k * 0.5)
        u, s, vh = torch.linalg.svd(full)
        best = (u[..., :r] * s[:, None, :r]) @ vh[:, :r]
        pa, pb = adapter_for(pruned.get_submodule(mod_name)).factors(pruned.get_submodule(mod_name))[pair]
        got = (pa @ pb.transpose(1, 2)).double()
        torch.testing.assert_close(got, best, atol=1e-4 * full.abs().max().item(), rtol=1e-4)
        va, vb = adapter_for(vanilla.get_submodule(mod_name)).factors(vanilla.get_submodule(mod_name))[pair]
        err_v = ((va @ vb.transpose(1, 2)).double() - full).norm(dim=(1, 2))
        assert ((got - full).norm(dim=(1, 2)) <= err_v + 1e-6).all()


def test_sizes_drop_exactly(family):
    name, model, out, targets = family
    target = targets[-1]
    pruned = cc.prune(model, ratio=0.25, target=target)
    removed = 0
    for mod_name, module, adapter in cc.architectures.attention_modules(model):
        per_dir = adapter.params_per_direction(module)
        for pair, (a, _) in adapter.factors(module).items():
            if target in (pair, "both"):
                removed += a.shape[0] * (a.shape[2] - round(a.shape[2] * 0.75)) * per_dir[pair]
    assert parameter_count(model) - parameter_count(pruned) == removed
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters()) == removed


def test_save_load_identical(family, tmp_path):
    name, model, out, targets = family
    pruned = cc.prune(model, ratio=0.5, target=targets[-1], mode="global")
    again = cc.load_pruned(cc.save_pruned(pruned, tmp_path / name))
    torch.testing.assert_close(out(again), out(pruned), **FP32)


def test_llama_kv_cache_bytes(make_llama):
    model = make_llama()
    pruned = cc.prune(model, ratio=0.5, target="vo")
    # 2 layers x 2 KV heads x 4 value features removed, float32
    assert kv_cache_bytes_per_token(model) - kv_cache_bytes_per_token(pruned) == 2 * 2 * 4 * 4
    out = pruned(LM_IDS[:1], use_cache=True)
    assert output_cache(out).layers[0].values.shape[-1] == 4
    assert output_cache(out).layers[0].keys.shape[-1] == 8


def test_llama_with_attention_bias(make_llama):
    model = make_llama(bias=True)
    torch.testing.assert_close(llama_out(cc.prune(model, ratio=0.0, target="vo")), llama_out(model), **FP32)


def test_llama_refuses_qk_with_the_reason(make_llama):
    with pytest.raises(ValueError, match="rotary position embeddings.*use target='vo'"):
        cc.prune(make_llama(), ratio=0.5, target="qk")
    assert "qk" not in next(iter(cc.spectra(make_llama()).values()))


def greedy(model, step, prompt, n):
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, step(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_llama_generate_matches_full_forward(make_llama):
    pruned = cc.prune(make_llama(), ratio=0.5, target="vo", mode="global")
    prompt = LM_IDS[:1, :4]
    out = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, greedy(pruned, lambda ids: pruned(ids).logits, prompt, 8))


def test_whisper_generate_matches_full_forward_with_cross_attention_cache(make_whisper):
    pruned = cc.prune(make_whisper(), ratio=0.5, target="both", mode="global")
    out = pruned.generate(FEATS, max_new_tokens=8, do_sample=False, decoder_input_ids=DEC_IDS[:, :1])
    ref = greedy(pruned, lambda ids: pruned(input_features=FEATS, decoder_input_ids=ids).logits, DEC_IDS[:, :1], 8)
    new = ref[:, 1:]  # Whisper's generate returns only the generated tokens, not the decoder prompt
    assert torch.equal(out[:, -new.shape[1] :], new[:, : out.shape[1]])


def test_whisper_kv_bytes_count_only_decoder_self_attention(make_whisper):
    model = make_whisper()
    pruned = cc.prune(model, ratio=0.5, target="both")
    # 2 decoder layers x 3 heads x (8 key + 8 value) features removed, float32
    assert kv_cache_bytes_per_token(model) - kv_cache_bytes_per_token(pruned) == 2 * 3 * 16 * 4


def test_unet_cross_attention_has_different_widths(make_unet):
    model = make_unet()
    attn2 = model.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    a, b = adapter_for(attn2).factors(attn2)["qk"]
    assert a.shape[1] == 64 + 1 and b.shape[1] == 48 + 1  # query width 64, text width 48
    pruned = cc.prune(model, ratio=0.5, target="both")
    p2 = pruned.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    assert p2.scale == attn2.scale  # the original softmax scale
    assert p2.to_k.out_features == p2.heads * 8


@pytest.mark.parametrize("route", ["eager", "padded"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unequal_widths_take_fast_exact_routes_on_cpu(make_llama, make_gpt2, arch, route, monkeypatch):
    """Values narrower (Llama V-O) or wider (GPT-2 Q-K) than queries/keys: with SDPA on the CPU a prompt
    zero-pads the narrow side, and a decoding step takes eager attention once the cache is large;
    both equal the eager model."""
    import copy

    from clover_core.architectures.remote import clover_attention

    model, target = (make_llama(), "vo") if arch == "llama" else (make_gpt2("3x16"), "qk")
    pruned = cc.prune(model, ratio=0.5, target=target)
    eager = copy.deepcopy(pruned)
    eager.config._attn_implementation = "eager"
    assert pruned.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    calls = []
    real = clover_attention.eager_attention
    monkeypatch.setattr(
        clover_attention, "eager_attention", lambda m, q, *a, **k: calls.append(q.shape[-2]) or real(m, q, *a, **k)
    )
    limit = 0 if route == "eager" else 2**40  # the tiny test cache counts as large, or as small
    monkeypatch.setattr(clover_attention, "PAD_CACHE_BYTES", limit)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(ids, attention_mask=mask).logits[mask.bool()],
            eager(ids, attention_mask=mask).logits[mask.bool()],
            **FP32,
        )
        assert calls and set(calls) == {7}  # only the eager model's own calls: the prompt kept SDPA
        calls.clear()
        kw = dict(
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        fast = pruned.generate(ids, **kw)
        assert (1 in calls) == (route == "eager")  # decoding steps: eager attention, or padded SDPA
        slow = eager.generate(ids, **kw)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.scores, slow.scores):
        torch.testing.assert_close(a, b, **FP32)


def test_fused_widths_per_device():
    from clover_core.architectures.remote.clover_attention import fused_widths

    assert fused_widths(12, 16, "cpu") == (16, 16) and fused_widths(16, 16, "cpu") == (16, 16)
    assert fused_widths(12, 16, "cuda") == (16, 16)
    assert fused_widths(13, 64, "cuda") == (16, 64)
    assert fused_widths(40, 64, "cuda") == (40, 64)  # unequal but divisible by 8: kept as they are
    assert fused_widths(20, 12, "mps") == (20, 12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_rule_pads_widths_to_multiples_of_8_exactly(make_llama, make_gpt2, arch, monkeypatch):
    """The CUDA branch of the attention, run on CPU tensors: pruned widths (Llama's V-O 4 of 8, GPT-2's
    Q-K 12 of 16) reach SDPA zero-padded to multiples of 8, and the model equals the eager one."""
    import copy

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from clover_core.architectures.remote import clover_attention

    model, target, ratio = (make_llama(), "vo", 0.5) if arch == "llama" else (make_gpt2("3x16"), "qk", 0.25)
    pruned = cc.prune(model, ratio=ratio, target=target)
    eager = copy.deepcopy(pruned)
    eager.config._attn_implementation = "eager"
    rule = clover_attention.fused_widths
    monkeypatch.setattr(clover_attention, "fused_widths", lambda qk, v, _device: rule(qk, v, "cuda"))
    widths, sdpa = [], ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, q, k, v, *args, **kwargs):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(module, q, k, v, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, eager(ids).logits, **FP32)
        fast, slow = pruned.generate(ids, **kw), eager.generate(ids, **kw)
    assert widths and all(w % 8 == 0 for triple in widths for w in triple)
    assert {triple[0] for triple in widths} == {8 if arch == "llama" else 16}
    assert torch.equal(fast.sequences, slow.sequences)
