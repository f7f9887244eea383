"""Can we prune a model larger than memory? Peak RSS of the streaming prune of a sharded checkpoint.

    PYTHONPATH=. python benchmarks/stream_memory.py [--model gpt2-xl] [--shard-size 1GB] [--dir /tmp]

1. Writes a sharded safetensors checkpoint of the model's exact structure (GPT-2 XL: 1.56B
   parameters, ~6.2 GB in float32) with random weights, one tensor at a time, so writing it never
   holds the model either. It checks the free disk space first and refuses if the checkpoint and the
   pruned copy would not fit.
2. Runs ``python -m clover_core prune --model DIR ...`` in a subprocess that reports its own peak
   resident set size (``VmHWM``) as it exits, and, for reference, the peak of a subprocess that only
   imports the same libraries and builds the meta skeleton (the interpreter's floor).
3. Reports peak RSS / checkpoint size, and against "largest shard + one transformer layer".
4. Deletes everything it wrote (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
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
from clover_core.stream import ShardWriter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each child reports its own high-water RSS (VmHWM) as it exits: the kernel's rusage of a child also
# counts the parent's pages at fork time (Linux folds the pre-exec memory into ru_maxrss).
REPORT = "print('VmHWM_KiB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
FLOOR = ("import clover_core, clover_core.__main__, clover_core.stream as s, sys, pathlib, torch\n"
         "s._skeleton(pathlib.Path(sys.argv[1]), torch.float32)\n" + REPORT)
CLI = ("import runpy, sys\nsys.argv = ['clover_core', *sys.argv[1:]]\ntry:\n"
       "    runpy.run_module('clover_core', run_name='__main__', alter_sys=True)\nfinally:\n    " + REPORT)


def write_checkpoint(name: str, folder: Path, shard_bytes: int) -> tuple[int, int, int]:
    """A ``save_pretrained``-layout checkpoint with random weights, written tensor by tensor.

    Returns:
        ``(total bytes, largest shard bytes, bytes of one transformer layer)``.
    """
    skeleton = build_model(name, "meta")
    state = skeleton.state_dict()
    stored = {n for n, _ in skeleton.named_parameters()}  # tied weights once, as save_pretrained writes them
    folder.mkdir(parents=True)
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(folder)
    writer = ShardWriter(folder, shard_bytes, reserve=64 * 1024)
    gen = torch.Generator().manual_seed(0)
    for key in (k for k in state if k in stored):
        t = torch.empty(state[key].shape)
        t.fill_(1.0) if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else t.normal_(0, 0.02, generator=gen)
        writer.add({key: t})
    writer.close()
    layer = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("transformer.h.0."))
    shards = list(folder.glob("*.safetensors"))
    return sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards), layer


def peak_rss(code: str, *argv: str) -> tuple[int, float, str]:
    """Run ``python -c code argv...``; its peak RSS in bytes (as it reports it), wall seconds, output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
    kib = int(out.rsplit("VmHWM_KiB", 1)[1].split()[0])
    return kib * 1024, time.perf_counter() - start, out


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    print(f"disk: {gib(free)} free in {folder}, {gib(need)} needed")
    if free < need:
        raise SystemExit(f"not enough disk in {folder}: use --dir elsewhere, or a smaller --model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-xl", choices=["gpt2-xl", "gpt2-small"])
    parser.add_argument("--shard-size", default="1GB", help="input shard size (default 1GB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (default: the temp dir)")
    parser.add_argument("--prune", default="--ratio 0.5 --mode global --target qk",
                        help="pruning arguments passed to python -m clover_core prune")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    args = parser.parse_args(argv)
    from transformers.utils.hub import convert_file_size_to_int

    params = sum(p.numel() for p in build_model(args.model, "meta").parameters())
    check_disk(Path(args.dir), int(params * 4 * 2.1))  # the checkpoint and its pruned copy, with margin
    work = Path(tempfile.mkdtemp(prefix="clover-stream-", dir=args.dir))
    try:
        start = time.perf_counter()
        total, largest, layer = write_checkpoint(args.model, work / "src", convert_file_size_to_int(args.shard_size))
        n_tensors = len(json.loads((work / "src" / "model.safetensors.index.json").read_text())["weight_map"].values())
        print(f"checkpoint: {args.model}, {gib(total)} in shards of <= {args.shard_size} (largest {gib(largest)}), "
              f"written in {time.perf_counter() - start:.0f} s; one layer = {gib(layer)}; {n_tensors} tensors")
        floor, _, _ = peak_rss(FLOOR, str(work / "src"))
        peak, seconds, out = peak_rss(CLI, "prune", "--model", str(work / "src"), "--out", str(work / "pruned"),
                                      *args.prune.split())
        print(next((line for line in out.splitlines() if line.strip().startswith("pruned:")), ""))
        written = sum(p.stat().st_size for p in (work / "pruned").glob("*.safetensors"))
        bound = largest + layer
        print(f"streaming prune ({args.prune}): {seconds:.0f} s, wrote {gib(written)}")
        print(f"  peak RSS                         {gib(peak)}")
        print(f"  peak RSS / checkpoint size       {peak / total:.3f}")
        print(f"  largest shard + one layer        {gib(bound)}  -> peak RSS / that = {peak / bound:.2f} "
              f"(target < 1)")
        print(f"  interpreter floor (imports + meta skeleton, no weights): {gib(floor)}; "
              f"peak above it: {gib(peak - floor)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
