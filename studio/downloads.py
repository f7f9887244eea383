"""Downloads: the app's scratch folder, swept of files older than an hour, and pruned checkpoints
zipped for the browser (no UI code here)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from clover_core.io.checkpoint import save_pruned

from .session import PrunedPair

log = logging.getLogger(__name__)


class ScratchFolder:
    """The app's own temporary folder; entries older than ``max_age_s`` are removed by :meth:`sweep`."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = 3600.0):
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "clover-studio"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s

    def sweep(self) -> int:
        """Remove entries last modified more than ``max_age_s`` ago; returns how many."""
        cutoff, removed = time.time() - self.max_age_s, 0
        for entry in self.root.iterdir():
            try:
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                    removed += 1
            except FileNotFoundError:  # swept by another request at the same time
                continue
        return removed

    def start_sweeping(self, interval_s: float | None = None) -> threading.Event:
        """Sweep every ``interval_s`` seconds (default: a quarter of ``max_age_s``) in a daemon thread,
        so files go away on schedule even when nobody downloads; set the returned event to stop it."""
        interval = interval_s if interval_s is not None else self.max_age_s / 4
        if not interval > 0:
            raise ValueError(f"interval_s={interval_s!r} must be a positive number of seconds")
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.sweep()
                except OSError as e:  # a vanished or unreadable root: try again next time
                    log.warning("sweeping %s failed: %s", self.root, e)

        threading.Thread(target=loop, name="clover-scratch-sweeper", daemon=True).start()
        return stop

    def new_dir(self, prefix: str) -> Path:
        """A fresh, uniquely named folder inside the root."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))


def export_checkpoint(pair: PrunedPair, folder: str | os.PathLike) -> Path:
    """The CLOVER model saved with :func:`~clover_core.save_pruned` and zipped (stored: weights barely compress).

    Returns:
        ``folder/<model>-clover-<target>-<mode>-<ratio>.zip``; the archive holds one folder of that name.
    """
    s = pair.setting
    stem = f"{Path(s.model).name}-clover-{s.target}-{s.mode}-{s.ratio:g}" + (
        "-calibrated" if s.scores == "calibrated" else ""
    )
    folder = Path(folder)
    processor = None if pair.loaded.kind == "diffusion" else pair.loaded.processor  # the UNet only
    saved = save_pruned(pair.clover, folder / stem, processor=processor)
    archive = folder / f"{stem}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(saved.rglob("*")):
            if path.is_file():
                zf.write(path, Path(stem) / path.relative_to(saved))
    shutil.rmtree(saved)
    return archive
