"""What every benchmark shares: the device, a timer, and full-size model shapes built from configs.

Models are described by their configs (GPT-2 XL, Whisper-large-v3, the SDXL UNet, SmolLM2-135M) and
built either on the ``meta`` device (shapes only, no memory) or with random weights, without ever
running the slow default initializers. No weights are downloaded.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

_clock = time.perf_counter  # set by setup_device from --clock
MODELS = ("gpt2-xl", "whisper-large-v3", "sdxl-unet", "smollm2-135m", "gpt2-small")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, common to every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall: elapsed time; process: CPU time of this process, steadier on a shared "
        "machine (CPU only; with one thread it is the work done)",
    )


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check ``--device`` and print what the figures were measured on."""
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _clock = time.process_time if args.clock == "process" and device.type == "cpu" else time.perf_counter
    print(f"clock: {'process CPU time' if _clock is time.process_time else 'wall time'}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every figure
        print(f"device: {torch.cuda.get_device_name(device)} ({args.device}), torch {torch.__version__}")
    else:
        print(
            f"device: CPU {cpu_name()}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores, torch {torch.__version__}"
        )
    return device


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in seconds (the minimum is the least noisy estimate
    on a shared machine), on the clock ``--clock`` chose."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = _clock()
        fn()
        sync(device)
        best = min(best, _clock() - start)
    return best


def cpu_split(fn: Callable[[], object]) -> tuple[float, float]:
    """User and system CPU seconds of one run of ``fn`` (this process, every thread)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def with_cache(model: nn.Module, cache: object) -> dict:
    """The keyword that hands ``model`` a KV cache, under the name its transformers version uses."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config_for(name: str):
    """The transformers / diffusers config of a benchmark model, by name."""
    from transformers import GPT2Config, LlamaConfig, WhisperConfig

    if name == "gpt2-xl":
        return GPT2Config(n_layer=48, n_head=25, n_embd=1600, n_positions=1024, vocab_size=50257)
    if name == "gpt2-small":
        return GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    if name == "whisper-large-v3":
        return WhisperConfig(
            d_model=1280,
            encoder_layers=32,
            decoder_layers=32,
            encoder_attention_heads=20,
            decoder_attention_heads=20,
            encoder_ffn_dim=5120,
            decoder_ffn_dim=5120,
            num_mel_bins=128,
            vocab_size=51866,
        )
    if name == "smollm2-135m":
        return LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
    if name == "sdxl-unet":
        return dict(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    raise SystemExit(f"model {name!r} is not one of {', '.join(MODELS)}")


def build_model(
    name: str, device: torch.device | str = "meta", seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A full-size model from its config: shapes only on ``meta``, random N(0, 0.02) weights elsewhere.

    Weights are allocated uninitialized and filled once (no default initializers, which take minutes
    at this size); norm scales are set to 1 so forward passes stay well-behaved.
    """
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, WhisperForConditionalGeneration
    from transformers.initialization import no_init_weights

    from clover_core.io.checkpoint import cast_model

    config = config_for(name)
    with torch.device(device), no_init_weights():
        if name == "sdxl-unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**config)
        else:
            cls = {"gpt2": GPT2LMHeadModel, "whisper": WhisperForConditionalGeneration, "llama": LlamaForCausalLM}[
                config.model_type
            ]
            model = cls(config)
    model = cast_model(model, dtype).eval()
    if hasattr(model, "tie_weights"):  # transformers: no_init_weights also skips the tying init does
        model.tie_weights()
    if torch.device(device).type != "meta":
        randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place: N(0, 0.02) weights and biases, ones for norm scales."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def gib(n_bytes: float) -> str:
    """Bytes as a short human-readable string."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"
