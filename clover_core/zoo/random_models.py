"""Small models with RANDOM weights, built from configs: every code path of the engine offline.

Their outputs carry no meaning; they exist so the CLI, the app and the figure scripts run end to end
on a machine that cannot reach the model hubs. The real checkpoints load by hub id or folder.
"""

from __future__ import annotations

import torch
from torch import nn

from .packages import gpt2_tokenizer


def tiny_gpt2(seed: int = 0) -> tuple[nn.Module, object]:
    """A small GPT-2 with RANDOM weights built from a config (4 layers, 4 heads of 64), seeded.

    It exercises every code path of the engine offline; its outputs are not meaningful text.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval(), gpt2_tokenizer()


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` with SDXL's structure: two text encoders whose hidden
    states are concatenated (widths 16 + 32 = cross-attention width 48), a pooled text embedding and
    ``text_time`` conditioning, self- and cross-attention blocks, a VAE; 32 x 32 images.

    Returns:
        ``(unet, pipeline)``, on the CPU, float32, eval mode.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
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
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    )
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 77
    common = {
        "vocab_size": len(tokenizer),
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
        "hidden_act": "gelu",
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return unet, pipe


def with_unet(pipe, unet: nn.Module):
    """A pipeline sharing every component of ``pipe`` but its UNet (no weights are copied)."""
    components = dict(pipe.components)
    components["unet"] = unet
    new = type(pipe)(**components)
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def generate_image(pipe, prompt: str, *, seed: int = 0, steps: int = 20, size: int | None = None) -> torch.Tensor:
    """One image for ``prompt`` as a ``(3, H, W)`` float tensor in [0, 1]; same seed -> same noise."""
    device = pipe.unet.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        height=size,
        width=size,
        guidance_scale=5.0,
    )
    return out.images[0].float().clamp(0, 1).to(device)
