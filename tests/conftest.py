"""Tiny real models from configs (odd head counts too), seeded, in eval mode. No network.

The offline models' cache (``CLOVER_CACHE``: SmolLM2 converted from its GGUF file) is a temporary
folder of this test session, never the user's own ``~/.cache/clover_studio``; subprocesses inherit it.
"""

import contextlib
import os
import shutil
import socket
import tempfile

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

torch.set_num_threads(2)


def pytest_configure(config):
    config.clover_cache = tempfile.mkdtemp(prefix="clover-test-cache-")
    os.environ["CLOVER_CACHE"] = config.clover_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "clover_cache", ""), ignore_errors=True)


GPT2_SHAPES = {
    "3x16": dict(n_layer=2, n_head=3, n_embd=48),  # odd head count
    "5x8": dict(n_layer=3, n_head=5, n_embd=40),
    "2x32": dict(n_layer=2, n_head=2, n_embd=64, scale_attn_by_inverse_layer_idx=True),
}


@pytest.fixture
def make_gpt2():
    """Factory: a tiny random GPT-2 (vocab 97, 64 positions) with deterministic weights."""

    def make(shape: str = "3x16", seed: int = 0, attn: str = "sdpa") -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=97,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            attn_implementation=attn,
            **GPT2_SHAPES[shape],
        )
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():  # non-zero biases, so the folded bias row is exercised
            for name, p in model.named_parameters():
                if name.endswith("attn.bias") or name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
        return model

    return make


@pytest.fixture
def tokens():
    """Deterministic token ids (batch 2, 12 tokens) for the tiny models."""
    return torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_whisper():
    """Factory: a tiny random Whisper (3 heads of 16, encoder and decoder, biases randomized)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    def make(seed: int = 0):
        torch.manual_seed(seed)
        config = WhisperConfig(
            vocab_size=100,
            d_model=48,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=3,
            decoder_attention_heads=3,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=20,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=1,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        )
        model = WhisperForConditionalGeneration(config).eval()
        _randomize_biases(model)
        return model

    return make


@pytest.fixture
def make_llama():
    """Factory: a tiny random Llama with grouped-query attention (6 query heads, 2 KV heads of 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, bias: bool = False):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=100,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            attention_bias=bias,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config).eval()
        _randomize_biases(model)
        return model

    return make


@pytest.fixture
def make_unet():
    """Factory: a tiny SDXL-shaped UNet (cross-attention width 48 != query widths, text_time embeddings)."""
    from diffusers import UNet2DConditionModel

    def make(seed: int = 0):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=48,
            norm_num_groups=8,
        ).eval()
        _randomize_biases(model)
        return model

    return make


def unet_inputs(seed: int = 0):
    """Inputs for the tiny UNet: latents, timestep, text states and SDXL's added conditions."""
    gen = torch.Generator().manual_seed(seed)
    added = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}
    return torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10]), torch.randn(1, 7, 48, generator=gen), added


def _randomize_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ("attn" in name or "proj" in name or "to_out" in name):
                p.normal_(0, 0.5)


@contextlib.contextmanager
def launched_app(scratch, *, cache=None, launch=None, **env):
    """The web app on a free loopback port with an 8 GB model cache; yields its URL, closes it after.

    Its quality figures use 128 WikiText-2 tokens (the page uses 512); ``cache`` replaces the model
    cache, ``launch`` adds options to ``launch()``, ``env`` sets environment variables.
    """
    import app
    from studio import cache as model_cache
    from studio import downloads
    from studio import session as pruning

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(pruning, "LM_EVAL_TOKENS", 128)
        demo = app.build_demo(cache or model_cache.ModelCache(8 * 2**30), downloads.ScratchFolder(scratch))
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **(launch or {}))
        try:
            yield demo.local_url
        finally:
            demo.close()
