"""Can we prune a model larger than memory? Peak RSS of the streaming prune of a sharded checkpoint.

    PYTHONPATH=. python benchmarks/stream_memory.py [--model gpt2-xl|sdxl-unet] [--shard-size 1GB] [--dir /tmp]
        [--baseline] [--spectra]

1. Writes a sharded safetensors checkpoint of the model's exact structure (GPT-2 XL: 1.56B
   parameters, ~6.2 GB in float32; SDXL's UNet: 2.57B, ~10.3 GB, in the diffusers layout of a
   pipeline's ``unet/``) with random weights, one tensor at a time, so writing it never holds the
   model either. It checks the free disk space first and refuses if the checkpoint and the pruned
   copy would not fit.
2. Runs ``python -m clover_core prune --model DIR ...`` in a subprocess that reports its own peak
   resident set size (``VmHWM``) as it exits, and, for reference, the peak of a subprocess that only
   imports the same libraries and builds the meta skeleton (the interpreter's floor).
3. Reports peak RSS / checkpoint size, and against "largest shard + one layer" (a transformer layer;
   for the UNet, its largest transformer block); with ``--baseline``, also against the same command
   with streaming off (the model loaded whole).
4. With ``--spectra``, the same for ``python -m clover_core spectra`` (streamed, and loaded whole with
   ``--baseline``).
5. Deletes everything it wrote (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_model, gib  # noqa: E402
from clover_core.io.safetensors_files import ShardWriter  # noqa: E402
from clover_core.io.weights import WEIGHT_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each child reports its own high-water RSS (VmHWM) as it exits: the kernel's rusage of a child also
# counts the parent's pages at fork time (Linux folds the pre-exec memory into ru_maxrss).
REPORT = "print('VmHWM_KiB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
FLOOR = (
    "import clover_core, clover_core.__main__, clover_core.io.stream as s, sys, pathlib, torch\n"
    "s._skeleton(pathlib.Path(sys.argv[1]), torch.float32)\n" + REPORT
)
CLI = (
    "import runpy, sys\nsys.argv = ['clover_core', *sys.argv[1:]]\ntry:\n"
    "    runpy.run_module('clover_core', run_name='__main__', alter_sys=True)\nfinally:\n    " + REPORT
)
# The baseline: the same command with streaming off (load_model, prune, save_pruned: the model whole).
IN_MEMORY = (
    "import sys\nimport clover_core.__main__ as cli\ncli.streamable = lambda name: None\ntry:\n"
    "    cli.main(sys.argv[1:])\nfinally:\n    " + REPORT
)


def write_checkpoint(name: str, folder: Path, shard_bytes: int) -> tuple[int, int, int, int]:
    """A ``save_pretrained``-layout checkpoint with random weights, written tensor by tensor.

    Returns:
        ``(total bytes, largest shard bytes, bytes of one layer, tensors written)``.
    """
    skeleton = build_model(name, "meta")
    state = skeleton.state_dict()
    stored = {n for n, _ in skeleton.named_parameters()}  # tied weights once, as save_pretrained writes them
    folder.mkdir(parents=True)
    diffusers = hasattr(skeleton, "register_to_config")
    if diffusers:
        skeleton.save_config(folder)
    else:
        skeleton.config.architectures = [type(skeleton).__name__]
        skeleton.config.save_pretrained(folder)
    writer = ShardWriter(folder, shard_bytes, reserve=256 * 1024, stem=WEIGHT_NAMES[diffusers])
    gen = torch.Generator().manual_seed(0)
    keys = [k for k in state if k in stored]
    for key in keys:
        t = torch.empty(state[key].shape)
        norm_scale = state[key].dim() == 1 and key.endswith("weight") and ("norm" in key or "ln_" in key)
        t.fill_(1.0) if norm_scale else t.normal_(0, 0.02, generator=gen)
        writer.add({key: t})
    writer.close()
    shards = list(folder.glob("*.safetensors"))
    return (
        sum(p.stat().st_size for p in shards),
        max(p.stat().st_size for p in shards),
        layer_bytes(state, diffusers),
        len(keys),
    )


def layer_bytes(state: dict[str, torch.Tensor], diffusers: bool) -> int:
    """The bytes of one transformer layer (GPT-2), or of the UNet's largest transformer block."""

    def block(key: str) -> str | None:
        if diffusers:  # down_blocks.2.attentions.0.transformer_blocks.7.attn1.to_q.weight
            head, sep, rest = key.partition(".transformer_blocks.")
            return head + sep + rest.split(".")[0] if sep else None
        return "transformer.h.0" if key.startswith("transformer.h.0.") else None

    sizes: dict[str, int] = {}
    for key, t in state.items():
        if (name := block(key)) is not None:
            sizes[name] = sizes.get(name, 0) + t.numel() * t.element_size()
    return max(sizes.values())


def peak_rss(code: str, *argv: str) -> tuple[int, float, str]:
    """Run ``python -c code argv...``; its peak RSS in bytes (as it reports it), wall seconds, output."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
    kib = int(out.rsplit("VmHWM_KiB", 1)[1].split()[0])
    return kib * 1024, time.perf_counter() - start, out


def spectra_peaks(work: Path, total: int, baseline: bool) -> None:
    """``python -m clover_core spectra`` on the checkpoint: streamed, and loaded whole for comparison."""
    argv = ("spectra", "--model", str(work / "src"), "--out", str(work / "spectra.json"))
    peak, seconds, _ = peak_rss(CLI, *argv)
    print(f"spectra, streamed: {seconds:.0f} s, peak RSS {gib(peak)} = {peak / total:.3f} x the checkpoint")
    if baseline:
        print_baseline(peak, *argv)


def print_baseline(streamed_peak: int, *argv: str) -> None:
    """The same command with streaming off (the model loaded whole): its peak against the streamed one."""
    base, seconds, _ = peak_rss(IN_MEMORY, *argv)
    print(
        f"  baseline, loaded whole: peak RSS {gib(base)} in {seconds:.0f} s -> streamed / loaded whole "
        f"= {streamed_peak / base:.3f}"
    )


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    print(f"disk: {gib(free)} free in {folder}, {gib(need)} needed")
    if free < need:
        raise SystemExit(f"not enough disk in {folder}: use --dir elsewhere, or a smaller --model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-xl", choices=["gpt2-xl", "gpt2-small", "sdxl-unet"])
    parser.add_argument("--shard-size", default="1GB", help="input shard size (default 1GB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (default: the temp dir)")
    parser.add_argument(
        "--prune",
        default="--ratio 0.5 --mode global --target qk",
        help="pruning arguments passed to python -m clover_core prune",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run the same command with streaming off "
        "(the model loaded whole: needs about twice its size in memory) and compare",
    )
    parser.add_argument(
        "--spectra",
        action="store_true",
        help="also run python -m clover_core spectra on the checkpoint (streamed, and loaded whole with --baseline)",
    )
    args = parser.parse_args(argv)
    from transformers.utils.hub import convert_file_size_to_int

    params = sum(p.numel() for p in build_model(args.model, "meta").parameters())
    copies = 3.1 if args.baseline else 2.1  # the checkpoint and its pruned copies, with margin
    check_disk(Path(args.dir), int(params * 4 * copies))
    work = Path(tempfile.mkdtemp(prefix="clover-stream-", dir=args.dir))
    try:
        start = time.perf_counter()
        total, largest, layer, n_tensors = write_checkpoint(
            args.model, work / "src", convert_file_size_to_int(args.shard_size)
        )
        print(
            f"checkpoint: {args.model}, {gib(total)} in shards of <= {args.shard_size} (largest {gib(largest)}), "
            f"written in {time.perf_counter() - start:.0f} s; one layer = {gib(layer)}; {n_tensors} tensors"
        )
        floor, _, _ = peak_rss(FLOOR, str(work / "src"))
        peak, seconds, out = peak_rss(
            CLI, "prune", "--model", str(work / "src"), "--out", str(work / "pruned"), *args.prune.split()
        )
        print(next((line for line in out.splitlines() if line.strip().startswith("pruned:")), ""))
        written = sum(p.stat().st_size for p in (work / "pruned").glob("*.safetensors"))
        bound = largest + layer
        print(f"streaming prune ({args.prune}): {seconds:.0f} s, wrote {gib(written)}")
        print(f"  peak RSS                         {gib(peak)}")
        print(f"  peak RSS / checkpoint size       {peak / total:.3f}")
        print(f"  largest shard + one layer        {gib(bound)}  -> peak RSS / that = {peak / bound:.2f} (target < 1)")
        print(
            f"  interpreter floor (imports + meta skeleton, no weights): {gib(floor)}; "
            f"peak above it: {gib(peak - floor)}"
        )
        if args.baseline:
            print_baseline(
                peak, "prune", "--model", str(work / "src"), "--out", str(work / "in-memory"), *args.prune.split()
            )
        if args.spectra:
            spectra_peaks(work, total, args.baseline)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
