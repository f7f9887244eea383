"""Many users at once: the web app launched on loopback, driven by N concurrent ``gradio_client`` users
that mix models and pruning ratios for a bounded time.

    PYTHONPATH=. python benchmarks/load_test.py [--users 8] [--seconds 60] [--models gpt2-tiny-random sdxl-tiny-random]

First a single user runs every (model, ratio) job once: those results are the reference and their
latency the baseline. Then every user loops over the jobs (each starting at a different one) until
the time is up, checking each result against the reference: a different result would mean one
session's settings leaked into another's outputs. Prints requests, errors, cross-talk mismatches,
p50 / p95 latency, the concurrent p50 over the single-user p50, and the peak memory of the process
(app and users together); exits non-zero on any error or mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import gib, peak_rss_bytes  # noqa: E402

MODELS = {  # model -> (endpoint, extra inputs after the setting)
    "gpt2-tiny-random": ("/compare_text", ("The history of the city", 8)),
    "sdxl-tiny-random": ("/compare_images", ("a red barn in the snow", 0, 2)),
    "whisper-tiny.en": ("/compare_audio", ("hello_world", None)),
}
TARGET, MODE = "both", "uniform"


@dataclass
class Tally:
    """What the users saw, gathered under a lock."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def fingerprint(result: object) -> str:
    """A digest of an endpoint's outputs: texts as they are, images by their pixels (paths differ per call)."""
    from PIL import Image

    parts = []
    for item in result if isinstance(result, (list, tuple)) else [result]:
        path = item.get("path") if isinstance(item, dict) else item
        if (
            isinstance(path, str)
            and Path(path).suffix.lower() in {".png", ".webp", ".jpg", ".jpeg"}
            and Path(path).is_file()
        ):
            parts.append(np.asarray(Image.open(path)).tobytes())
        else:
            parts.append(repr(item).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def run_job(client, job: tuple[str, float]) -> tuple[str, float]:
    """One request of ``job`` = (model, ratio); returns the result's fingerprint and the latency in seconds."""
    model, ratio = job
    endpoint, extra = MODELS[model]
    start = time.perf_counter()
    result = client.predict(model, ratio, TARGET, MODE, *extra, api_name=endpoint)
    return fingerprint(result), time.perf_counter() - start


def user(index: int, url: str, jobs: list[tuple[str, float]], reference: dict, deadline: float, tally: Tally) -> None:
    """One user's session: its own client, the jobs in turn from its own starting point, until the deadline."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    i = index
    while time.perf_counter() < deadline:
        job = jobs[i % len(jobs)]
        i += 1
        try:
            digest, seconds = run_job(client, job)
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown, none stops the run
            with tally.lock:
                tally.errors.append(f"user {index} {job}: {type(e).__name__}: {e}")
            continue
        with tally.lock:
            tally.latencies.append(seconds)
            if digest != reference[job]:
                tally.mismatches.append(f"user {index} {job}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def launch(queue_size: int):
    """The app on a free loopback port (its own model cache and scratch folder); returns (demo, url)."""
    import os

    os.environ["CLOVER_QUEUE_SIZE"] = str(queue_size)
    import app
    from studio import cache as model_cache
    from studio import downloads

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scratch = downloads.ScratchFolder(tempfile.mkdtemp(prefix="clover-load-test-"))
    demo = app.build_demo(model_cache.ModelCache(8 * 2**30), scratch)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options())
    return demo, demo.local_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="concurrent gradio_client users (default 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the users run (default 60)")
    parser.add_argument("--models", nargs="+", default=["gpt2-tiny-random", "sdxl-tiny-random"], choices=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.users < 1 or args.seconds <= 0:
        parser.error("--users must be at least 1 and --seconds positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    from gradio_client import Client

    demo, url = launch(queue_size=2 * args.users)
    try:
        print(
            f"app on {url}: {args.users} users for {args.seconds:g} s, models {', '.join(args.models)}, "
            f"ratios {', '.join(f'{r:g}' for r in args.ratios)}, target {TARGET}, {torch.get_num_threads()} "
            "torch threads"
        )
        jobs = [(m, r) for m in args.models for r in args.ratios]
        single = Client(url, verbose=False)
        for model in args.models:  # load and decompose once, outside the timings
            single.predict(model, api_name="/load_model")
        reference, baseline = {}, []
        for job in jobs:  # the single-user run: reference results and latency
            reference[job], _ = run_job(single, job)  # the first call prunes; the second is the steady state
            digest, seconds = run_job(single, job)
            if digest != reference[job]:
                print(f"the single-user run is not reproducible for {job}")
                return 1
            baseline.append(seconds)
        distinct = len(set(reference.values()))
        print(
            f"single user   p50 {statistics.median(baseline):.2f} s over {len(jobs)} jobs; {distinct} of {len(jobs)} "
            "reference results distinct (cross-talk between them would show)"
        )
        tally = Tally()
        deadline = time.perf_counter() + args.seconds
        threads = [
            threading.Thread(target=user, args=(i, url, jobs, reference, deadline, tally)) for i in range(args.users)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        demo.close()
    single_p50, p50, p95 = statistics.median(baseline), percentile(tally.latencies, 50), percentile(tally.latencies, 95)
    print(
        f"requests      {len(tally.latencies) + len(tally.errors)} in {wall:.1f} s "
        f"({len(tally.latencies) / wall:.2f} completed / s)"
    )
    print(f"errors        {len(tally.errors)}")
    print(f"cross-talk    {len(tally.mismatches)} results differ from the single-user run")
    print(
        f"latency       p50 {p50:.2f} s, p95 {p95:.2f} s (single user: p50 {single_p50:.2f} s; "
        f"concurrent / single p50 = {p50 / single_p50:.1f}x with {args.users} users, one request at a time)"
    )
    print(f"peak memory   {gib(peak_rss_bytes())} RSS (app and users, one process)")
    for line in (tally.errors + tally.mismatches)[:10]:
        print(f"  {line}")
    return 1 if tally.errors or tally.mismatches or not tally.latencies else 0


if __name__ == "__main__":
    sys.exit(main())
