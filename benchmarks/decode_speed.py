"""Are pruned models faster? KV-cache bytes per token, prefill time and decode throughput of
CLOVER-pruned models against the original, with ``generate()`` and its real KV cache.

    PYTHONPATH=. python benchmarks/decode_speed.py [--model gpt2-small smollm2-135m] [--device cuda]

``--model`` takes the benchmark shapes (gpt2-small, gpt2-xl, smollm2-135m: random weights of the real
shapes; smollm2-135m uses the real offline weights when installed) or any name ``clover_core.load_model``
knows (e.g. a local folder or the project's gpt2-shakespeare). GPT-2 is pruned on Q-K and V-O,
Llama-family models on V-O (rotary Q-K cannot be). Decode throughput = batch * (N - 1) new tokens over
the time of ``generate(N)`` minus ``generate(1)`` (which is the prefill plus one step).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clover_core as cc  # noqa: E402
from benchmarks.common import MODELS, add_device_args, build_model, setup_device, timed, with_cache  # noqa: E402
from clover_core.architectures.remote import clover_attention  # noqa: E402
from clover_core.metrics import kv_cache_bytes_per_token, output_cache, parameter_count  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(name: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    if name == "smollm2-135m":
        try:
            return cc.load_model(name).model.to(device), "real weights"
        except (ModuleNotFoundError, FileNotFoundError, ValueError):
            pass
    if name in MODELS:
        return build_model(name, device), "random weights, real shapes"
    return cc.load_model(name).model.to(device), "loaded"


def variants(model: torch.nn.Module, ratio: float) -> list[tuple[str, torch.nn.Module]]:
    """The original, and CLOVER at ``ratio`` in uniform and global mode, as ``cc.prune`` builds them for
    deployment (head-major projections, the layout checkpoints store)."""
    dec = cc.decompose(model)
    target = "both" if "qk" in dec.pair_types else "vo"
    return [("original", model)] + [
        (f"clover {target} {mode} {ratio}", cc.prune(dec, ratio=ratio, target=target, mode=mode))
        for mode in ("uniform", "global")
    ]


class Unpadded:
    """A pruned model whose attention hands SDPA its widths as they are: none of the zero-padding that
    ``clover_attention.fused_widths`` asks for, and so none of the eager decoding steps that stand in
    for padding a large cache (the baseline the width rule is measured against); otherwise the model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _unpadded(self, fn, *args, **kwargs):
        with mock.patch.object(clover_attention, "fused_widths", lambda qk, v, _device: (qk, v)):
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._unpadded(self.model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._unpadded(self.model.generate, *args, **kwargs)


def measured_kv_bytes(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Bytes per token and sequence the real cache allocates after a prefill (padding included)."""
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / ids.numel()


def decode_rates(
    models: list, batch: int, prompt: int, new: int, device: torch.device, repeats: int
) -> list[tuple[float, float]]:
    """Per model: (prefill seconds, decode tokens per second) at ``batch`` with a ``prompt``-token
    context. The models take turns within each repeat (same machine load); the best run is kept."""
    vocab = models[0].config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    mask = torch.ones_like(ids)
    best = [[float("inf")] * 3 for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0

            def generate(n: int, model=model, pad=pad):
                return model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad,
                )

            runs = (lambda: model(ids, attention_mask=mask, use_cache=True), lambda: generate(1), lambda: generate(new))
            best[i] = [min(b, timed(fn, device, repeats=1, warmup=0)) for b, fn in zip(best[i], runs)]
    # generate(N) timed no slower than generate(1): the machine was too noisy to tell (NaN, printed n/a)
    return [(prefill, batch * (new - 1) / (many - one) if many > one else float("nan")) for prefill, one, many in best]


def step_times(models: list, batch: int, prompt: int, device: torch.device, repeats: int) -> list[float]:
    """Per model: the fastest single decoding step (one token for each of ``batch`` sequences, after a
    ``prompt``-token prefill, with the real cache), the models interleaved ``repeats`` times. Less noisy
    than the ``generate()`` difference for slow, large batches."""
    vocab = models[0].config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt), generator=gen).to(device)
    token = torch.randint(3, vocab, (batch, 1), generator=gen).to(device)
    caches = [output_cache(model(ids, use_cache=True)) for model in models]
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            kwargs = with_cache(model, copy.deepcopy(caches[i]))  # (outside the timed call)
            best[i] = min(best[i], timed(lambda: model(token, **kwargs, use_cache=True), device, repeats=1, warmup=0))
    return best


def sdpa_kernels(model: torch.nn.Module, device: torch.device, seq: int = 256, padded: bool = True) -> str:
    """Which fused CUDA attention kernels accept the q/k/v widths the first attention layer hands SDPA
    (the others fall back to the unfused math kernel). Pruned widths differ between q/k and v, which
    rules out flash attention; memory-efficient attention needs widths aligned to 8 elements in half
    precision, which pruned layers reach by zero-padding (``fused_widths``)."""
    attn = next(m for m in model.modules() if hasattr(m, "num_heads") or hasattr(m, "num_key_value_groups"))
    cfg = model.config
    heads = getattr(attn, "num_heads", None) or cfg.num_attention_heads
    head = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
    qk, v = getattr(attn, "qk_dim", head), getattr(attn, "v_dim", head)
    pruned = f"qk {qk}, v {v}"
    if padded and (hasattr(attn, "qk_dim") or hasattr(attn, "v_dim")):  # a CLOVER module pads its widths
        qk, v = clover_attention.fused_widths(qk, v, device.type)
    dtype = next(model.parameters()).dtype
    q, k = (torch.zeros(1, heads, seq, qk, device=device, dtype=dtype) for _ in range(2))
    val = torch.zeros(1, heads, seq, v, device=device, dtype=dtype)
    try:
        params = torch.backends.cuda.SDPAParams(q, k, val, None, 0.0, True, False)
    except (AttributeError, TypeError) as e:
        return f"unknown ({e})"
    checks = {
        "flash": torch.backends.cuda.can_use_flash_attention,
        "mem-efficient": torch.backends.cuda.can_use_efficient_attention,
        "cudnn": getattr(torch.backends.cuda, "can_use_cudnn_attention", None),
    }
    usable = [name for name, check in checks.items() if check is not None and check(params, False)]
    return f"{pruned} (SDPA sees qk {qk}, v {v}): " + (", ".join(usable) or "none (math fallback)")


def rate_cell(rate: float, base: float) -> str:
    """Decode tokens/s and its ratio to ``base``; n/a where the timing was too noisy to tell (NaN)."""
    if math.isnan(rate):
        return "decode n/a (noise)"
    return f"{rate:9.1f} tok/s" + ("      " if math.isnan(base) else f" {rate / base:4.2f}x")


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> None:
    model, what = load(name, device)
    model = model.to(DTYPES[args.dtype])
    model.generation_config.max_length = None
    print(
        f"\n== {name} ({parameter_count(model) / 1e6:.0f}M parameters, {what}, "
        f"attention {model.config._attn_implementation})"
    )
    rows = variants(model, args.ratio)
    if args.padding_baseline:  # the global model (ragged widths) once more, without the padding
        rows.append((f"{rows[-1][0]} unpadded", Unpadded(rows[-1][1])))
    probe = torch.randint(3, model.config.vocab_size, (1, 16)).to(device)
    base_kv = kv_cache_bytes_per_token(model)
    for label, m in rows:
        if isinstance(m, Unpadded):
            continue  # the same model as the row above
        kv, alloc = kv_cache_bytes_per_token(m), measured_kv_bytes(m, probe)
        print(
            f"  {label:<28} {parameter_count(m) / 1e6:7.1f}M params  KV cache {kv:>8,} B/token "
            f"({kv / base_kv:.2f}x; allocated {alloc:,.0f})"
        )
    if device.type == "cuda":
        for label, m in rows:
            kernels = sdpa_kernels(m, device, padded=not isinstance(m, Unpadded))
            print(f"  {label:<28} SDPA kernels usable at prefill: {kernels}")
    context = (
        min(args.long_context, model.config.max_position_embeddings - args.new_tokens)
        if hasattr(model.config, "max_position_embeddings")
        else args.long_context
    )
    cases = [(b, args.prompt) for b in args.batches] + ([(1, context)] if args.long_context else [])
    print(f"  {'batch x context':<18}" + "".join(f"{label:>34}" for label, _ in rows))
    with torch.no_grad():
        for batch, prompt in cases:
            results = decode_rates([m for _, m in rows], batch, prompt, args.new_tokens, device, args.repeats)
            base = results[0][1]
            cells = [f"{rate_cell(rate, base)} pf {pf * 1e3:6.0f}ms" for pf, rate in results]
            print(f"  {batch:>3} x {prompt:<12}" + "".join(f"{c:>34}" for c in cells))
            if args.padding_baseline:
                (pf_pad, rate_pad), (pf_raw, rate_raw) = results[-2:]
                decode = "n/a (noise)" if math.isnan(rate_pad / rate_raw) else f"{rate_pad / rate_raw:.2f}x faster"
                print(
                    f"  {'':<18}width rule, global model: prefill {pf_raw / pf_pad:.2f}x faster, "
                    f"decode {decode} than with the widths as they are"
                )
            if args.step_repeats:
                steps = step_times([m for _, m in rows], batch, prompt, device, args.step_repeats)
                cells = [f"step {t * 1e3:8.1f} ms {steps[0] / t:4.2f}x" for t in steps]
                print(f"  {'':<18}" + "".join(f"{c:>34}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument(
        "--model",
        nargs="+",
        default=["gpt2-small", "smollm2-135m"],
        help=f"benchmark shapes ({', '.join(MODELS)}) or any clover_core.load_model name",
    )
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="model dtype (bfloat16 is the usual choice on a GPU)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens for the batch sweep")
    parser.add_argument(
        "--long-context", type=int, default=1024, help="prompt tokens of the batch-1 long case (0: skip it)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the models (best kept)")
    parser.add_argument(
        "--padding-baseline",
        action="store_true",
        help="also run the global model with its widths handed to SDPA as they are, without "
        "the padding for the fused kernels (on CUDA: to multiples of 8; on the CPU: to "
        "equal widths) or the eager decoding steps that replace it for large caches",
    )
    parser.add_argument(
        "--step-repeats",
        type=int,
        default=0,
        help="also time single decoding steps, models interleaved, best of this many",
    )
    args = parser.parse_args(argv)
    device = setup_device(args)
    for name in args.model:
        run_model(name, device, args)


if __name__ == "__main__":
    main()
