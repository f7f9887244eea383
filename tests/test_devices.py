"""The engine on every device torch has here: the CPU always, CUDA wherever there is one.

On a CUDA machine these check what the CPU suite cannot: the decomposition with its Grams and
rotations on the device (and the small float64 algebra on the host), its float32 exactness with
TF32 matmuls switched on, pruning, the slider and
``generate()`` give the CPU's results, and pruned attention in half precision runs the fused kernel
its width rule pads for (see ``clover_core.architectures.remote.clover_attention.fused_widths``).
"""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import clover_core as cc

from .tolerances import FP32

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ],
    ),
]
# The fused kernel each device's width rule pads for: CPU flash attention needs equal widths, CUDA's
# memory-efficient kernel (the one that takes a value width unlike the query/key width) multiples of 8.
FUSED = {"cpu": SDPBackend.FLASH_ATTENTION, "cuda": SDPBackend.EFFICIENT_ATTENTION}
HALF = {"cpu": torch.bfloat16, "cuda": torch.float16}
# Half-precision logits against float32 ones (logits of order 1; bfloat16 keeps 8 bits).
HALF_LOGITS = dict(atol=5e-2, rtol=5e-2)


def lm_models(make_gpt2, make_llama):
    """Tiny GPT-2 (Q-K and V-O) and Llama (GQA + RoPE, V-O only), with their pruning targets."""
    return [(make_gpt2("3x16"), "both"), (make_llama(bias=True), "vo")]


@pytest.mark.parametrize("device", DEVICES)
def test_decomposition_on_the_device_matches_the_cpu(make_gpt2, make_llama, device):
    for model, _ in lm_models(make_gpt2, make_llama):
        cpu = cc.decompose(model)
        dev = cc.decompose(copy.deepcopy(model).to(device), rank_major=True)
        assert cpu.modules.keys() == dev.modules.keys()
        for name, md in cpu.modules.items():
            for pair, ref in md.pairs.items():
                got = dev.modules[name].pairs[pair]
                assert got.a.device.type == got.b.device.type == device
                torch.testing.assert_close(got.s.cpu(), ref.s, **FP32)
                torch.testing.assert_close(got.vanilla.cpu(), ref.vanilla, **FP32)
                # The same products (the singular vectors' signs may differ between devices).
                torch.testing.assert_close((got.a @ got.b.mT).cpu(), ref.a @ ref.b.mT, **FP32)


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_and_bf16_matmuls_leave_the_decomposition_unchanged(make_gpt2, device):
    """With the process's float32 matmuls in TF32 (cuBLAS) and bfloat16 (oneDNN), the decomposition on
    the device has the same bits as at full precision: the engine lifts the setting while it runs."""
    model = copy.deepcopy(make_gpt2("3x16")).to(device)
    expected = cc.decompose(model, rank_major=True)
    switches = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    try:
        for switch, value in zip(switches, ("tf32", "bf16")):
            switch.fp32_precision = value
        got = cc.decompose(model, rank_major=True)
        assert [s.fp32_precision for s in switches] == ["tf32", "bf16"]  # restored afterwards
    finally:
        for switch in switches:
            switch.fp32_precision = "none"
    for name, md in expected.modules.items():
        for pair, pd in md.pairs.items():
            other = got.modules[name].pairs[pair]
            assert torch.equal(pd.s, other.s) and torch.equal(pd.a, other.a) and torch.equal(pd.b, other.b), name


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_models_and_the_slider_on_the_device_match_the_cpu(make_gpt2, make_llama, tokens, device):
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    for model, target in lm_models(make_gpt2, make_llama):
        ref = cc.prune(model, ratio=0.5, target=target, mode="global")
        dec = cc.decompose(copy.deepcopy(model).to(device))
        pruned = cc.prune(dec, ratio=0.5, target=target, mode="global")
        slider = cc.Slider(dec)
        slider(0.25, target=target)
        slid = slider(0.5, target=target, mode="global")
        assert pruned.config.clover["ranks"] == slid.config.clover["ranks"] == ref.config.clover["ranks"]
        ids = tokens.to(device)
        with torch.no_grad():
            expected = ref(tokens).logits
            for m in (pruned, slid):
                assert next(m.parameters()).device.type == device
                torch.testing.assert_close(m(ids).logits.cpu(), expected, **FP32)
            assert torch.equal(pruned.generate(ids, **kw).cpu(), ref.generate(tokens, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_attention_in_half_precision_runs_the_fused_kernel(make_gpt2, make_llama, tokens, device):
    """Only the fused kernel allowed: SDPA raises if the padded widths do not suit it. Llama's V-O
    pruning leaves value widths of 4 (queries 8), GPT-2's Q-K pruning query/key widths of 12 (values
    16). The prompt's logits against the float32 model's, then three decoding steps with the cache."""
    ratios = {"vo": 0.5, "qk": 0.25}
    for model, target in ((make_llama(), "vo"), (make_gpt2("3x16"), "qk")):
        pruned = cc.prune(model, ratio=ratios[target], target=target)
        half = copy.deepcopy(pruned).to(device=device, dtype=HALF[device])
        ids = tokens.to(device)
        with torch.no_grad():
            expected = pruned(tokens).logits
        with torch.no_grad(), sdpa_kernel([FUSED[device]]):
            logits = half(ids).logits
            steps = half.generate(
                ids, max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
            ).scores  # decoding with the cache
        torch.testing.assert_close(logits.float().cpu(), expected, **HALF_LOGITS)
        assert len(steps) == 3 and all(torch.isfinite(s).all() for s in steps)
