"""The app's model cache: models loaded once, decomposed once, shared read-only by every user, and
kept in a least-recently-used cache under a memory budget (no UI code here)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clover_core.architectures import Kind, kind_of
from clover_core.decompose import Decomposition, decompose
from clover_core.models import load_model
from clover_core.zoo import EMBEDDED

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[nn.Module, object]]
Progress = Callable[[float, str], None]


@dataclass
class Loaded:
    """A model loaded once and shared read-only: never modified; pruned models share its weights outside
    the attention modules, and their attention weights are views of ``dec`` (its rotated factors and the
    rank-major copies of the original ones, made at load time) wherever no copy is needed.

    ``baseline`` caches the original model's measurements (filled under ``lock``); ``calibrated`` the
    decomposition with calibrated scores, made on first use (under ``calibration_lock``; see
    :mod:`studio.calibration`).
    """

    name: str
    model: nn.Module
    processor: object
    kind: Kind
    dec: Decomposition
    nbytes: int
    baseline: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    calibrated: Decomposition | None = field(default=None, repr=False)
    calibration_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def nbytes(*objects: object) -> int:
    """Bytes held by tensors, by modules' parameters and buffers, and by every module of a pipeline."""
    total, seen = 0, set()
    for obj in objects:
        parts = [obj] if isinstance(obj, (nn.Module, torch.Tensor)) else list(getattr(obj, "components", {}).values())
        for part in parts:
            if isinstance(part, torch.Tensor):
                tensors = [part]
            elif isinstance(part, nn.Module):
                tensors = [*part.parameters(), *part.buffers()]
            else:
                continue
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def report(progress: Progress | None, fraction: float, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(fraction, message)


class ModelCache:
    """Loaded and decomposed models by name, least recently used evicted beyond ``budget_bytes``.

    Args:
        budget_bytes: memory for models and their decompositions; the newest model is kept even
            when it alone exceeds the budget.
        device: where models are moved after loading (the caller chooses, e.g. ``"cuda"``).
        loaders: extra names -> ``() -> (model, processor)``, tried before :func:`load_model`.
        allow_local: accept local folders; off for a public server, whose disk is not the users'.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        device: str | torch.device = "cpu",
        loaders: dict[str, Loader] | None = None,
        allow_local: bool = False,
    ):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be positive")
        self.budget_bytes, self.device, self.allow_local = budget_bytes, torch.device(device), allow_local
        self.loaders = dict(loaders or {})
        self._entries: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def names(self) -> list[str]:
        """Cached model names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, name: str, progress: Progress | None = None) -> Loaded:
        """The cached model, loading and decomposing it on first use (one load per name at a time).

        Raises:
            ValueError: an unknown name, an unreachable hub id, or a local path when not allowed.
            ModuleNotFoundError: an offline model whose data package is missing.
            NotImplementedError: a model without attention CLOVER supports.
        """
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return self._entries[name]
            gate = self._loading.setdefault(name, threading.Lock())
        try:
            with gate:
                with self._lock:
                    if name in self._entries:
                        return self._entries[name]
                loaded = self._load(name, progress)
                with self._lock:
                    self._entries[name] = loaded
                    self._evict(keep=name)
        finally:
            with self._lock:  # one gate per name being loaded, not one per name ever typed
                if self._loading.get(name) is gate:
                    del self._loading[name]
        return loaded

    def _load(self, name: str, progress: Progress | None) -> Loaded:
        self._check_name(name)
        report(progress, 0.0, f"loading {name}")
        if name in self.loaders:
            model, processor = self.loaders[name]()
        else:
            bundle = load_model(name)
            model, processor = bundle.model, bundle.processor
        kind = kind_of(model, processor)
        if kind == "diffusion" and getattr(processor, "unet", None) is not model:
            raise ValueError(
                f"{name} is a diffusers {type(model).__name__} without its pipeline; the app draws "
                "images, which needs the whole pipeline: load the pipeline's folder (the one with "
                "model_index.json)"
            )
        (processor if kind == "diffusion" else model).to(self.device)
        report(progress, 0.3, f"decomposing the attention of {name} (once per model)")
        # pruned models (share_weights) slice the factors: written rank-major from the start
        dec = decompose(model.eval(), progress=True, rank_major=True)
        originals = [t for name, md in dec.modules.items() for pair in md.pairs for t in dec.original(name, pair)]
        size = nbytes(processor if kind == "diffusion" else model) + nbytes(
            *[t for md in dec.modules.values() for pd in md.pairs.values() for t in (pd.a, pd.b)], *originals
        )
        log.info("loaded %s (%s, %.2f GB with its decomposition)", name, kind, size / 1e9)
        return Loaded(name, model, processor, kind, dec, size)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"model={name!r} is empty; choose a model from the list or type a hub id")
        if name not in self.loaders and name not in EMBEDDED and not self.allow_local and Path(name).exists():
            raise ValueError(
                f"model={name!r} is a local path, and local models are disabled on this server; "
                "use a hub id (owner/name) or an offline model"
            )

    def _evict(self, keep: str) -> None:
        while len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.budget_bytes:
            name = next(n for n in self._entries if n != keep)
            del self._entries[name]
            log.info("evicted %s from the model cache (budget %.2f GB)", name, self.budget_bytes / 1e9)
