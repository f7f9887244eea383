"""The slider: one decomposed model re-pruned in place at any ratio, in milliseconds.

See :class:`Slider`. It plans like :func:`~clover_core.prune` and builds each attention module once;
a move only re-points the modules' weights at views of the decomposition's rank-major factors (CLOVER
at a uniform ratio) or at buffers it updates in place (ragged ranks), never copying the model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .architectures import padded_width
from .decompose import Decomposition, FactorStack, ModuleDecomposition
from .prune import (
    Allocation,
    Method,
    Mode,
    Plan,
    Prepared,
    PruneConfig,
    Selection,
    Target,
    adopt_config,
    attach_ranks,
    check_pairs,
    copy_outside_attention,
    keeps_leading,
    plan,
    select_pairs,
    set_submodule,
)
from .record import origin, pruning_meta, pruning_record, record


def _first_r(dec: Decomposition, config: PruneConfig) -> dict[str, dict[str, Selection]]:
    """:func:`plan` for CLOVER at a uniform ratio, without masks: the sorted spectra make every head's
    top ``r`` its first ``r`` columns (the same ``r`` as ``plan``)."""
    check_pairs(dec, config)
    return {
        name: {pair: round(md.pairs[pair].s.shape[1] * (1 - config.ratio)) for pair in config.pairs}
        for name, md in dec.modules.items()
    }


class Slider:
    """Re-prune one decomposed model at any ratio in milliseconds: what an interactive ratio slider needs.

    Every call returns the SAME model object, re-pointed to the new ranks: no SVD, no copy of the
    model and, for CLOVER at a uniform ratio, no copy of any weight. The slider's attention modules
    lay their projections out rank-major, as the decomposition then stores its rotated factors
    (``cc.decompose(model, rank_major=True)`` writes them so; any other decomposition is converted by
    :meth:`~clover_core.Decomposition.use_rank_major`, once, a copy of every factor), so keeping
    each head's best ``r`` directions is a slice of them (a view). Ragged per-head ranks (``global`` and
    ``threshold`` modes) zero each head's columns from its rank up to its layer's width on the narrower
    side of the pair only (which keeps every product exact), in one buffer per stack of equal-shaped
    modules (made on first use, a copy of that side of the stack's factors): a move copies back (or
    zeroes) only the columns whose zeroing changed, and modules whose kept columns did not change are
    left as they are.
    Weights outside the attention modules are the original model's; pairs left whole (and vanilla's
    original columns) come from a rank-major copy of the original factors, made on first use and shared
    by every slider of the same decomposition. Its kept columns equal those of :func:`prune` with the
    same arguments, and so do all its weights once saved (:func:`~clover_core.save_pruned` zeroes both
    sides' padding).

    Read-only, like ``prune(..., share_weights=True)``: evaluate, generate, save; a model returned
    earlier changes with the next call (use :func:`prune` for an independent model).

    Example::

        dec = cc.decompose(model, rank_major=True)
        slider = cc.Slider(dec)               # method="clover" (or "vanilla")
        for ratio in (0.25, 0.5, 0.75):
            pruned = slider(ratio, target="qk")
    """

    def __init__(self, dec: Decomposition, method: Method = "clover"):
        if not isinstance(dec, Decomposition):
            raise TypeError(f"Slider needs a Decomposition (cc.decompose(model)), got {type(dec).__name__}")
        PruneConfig(ratio=0.0, method=method)  # validates the method
        dec.use_rank_major()
        self.dec, self.method = dec, method
        self.model = copy_outside_attention(dec, share=True)  # attention modules built on first use
        self._modules: dict[str, tuple[nn.Module, dict[str, int]]] = {}
        self._ragged: dict[int, _RaggedStack] = {}  # per FactorStack, made on first use
        self._loaded: dict[str, tuple[dict, dict]] = {}  # module -> (factors it holds, its ranks)
        self._base = origin(dec.model, pruning_record(dec.model))

    def __call__(
        self,
        ratio: float | None = None,
        target: Target = "qk",
        mode: Mode = "uniform",
        threshold: float | None = None,
        allocation: Allocation = "raw",
    ) -> nn.Module:
        """The model pruned to ``ratio`` (or ``threshold``); arguments as in :func:`prune`.

        Raises:
            ValueError: an argument outside what is allowed (the message names it).
        """
        config = PruneConfig(
            ratio=ratio, target=target, method=self.method, mode=mode, threshold=threshold, allocation=allocation
        )
        if self.method == "clover" and mode == "uniform":
            masks = _first_r(self.dec, config)
        else:
            masks = plan(self.dec, config)
        ranks: dict[str, dict[str, list[int]]] = {}
        with torch.no_grad():
            ragged = self._ragged_columns(masks, config) if self.method == "clover" and mode != "uniform" else {}
            for name, md in self.dec.modules.items():
                selected, ranks[name] = select_pairs(
                    md, masks[name], self.method, functools.partial(self.dec.original, name), ragged.get(name)
                )
                held = self._loaded.get(name)
                current = held is not None and _same_tensors(held[0], selected)  # the views it holds
                if current and held[1] == ranks[name]:
                    continue  # its heads kept their ranks
                module, per_direction = self._module(name, md)
                if not current:  # (a buffer updated in place at the same width needs no re-pointing)
                    md.adapter.load_factors(module, selected, share=True)
                attach_ranks(module, md.adapter, ranks[name], per_direction)
                self._loaded[name] = selected, ranks[name]
        record(
            self.model, pruning_meta(self.dec.model, config, ranks, base=self._base, calibration=self.dec.calibration)
        )
        return self.model

    def _ragged_columns(self, masks: Plan, config: PruneConfig) -> dict[str, Prepared]:
        """CLOVER's kept columns at ragged ranks, ``{module: {pair: (factors, ranks)}}``, for every stack
        whose heads all keep their leading (best) columns: views of the stack's buffers, updated in place
        in a few operations for all its modules at once. Other pairs (ties in the spectra) are left to
        :func:`select_columns`."""
        prepared: dict[str, Prepared] = {}
        for stack in self.dec.stacks:
            if stack.pair not in config.pairs:
                continue
            kept = torch.stack([masks[name][stack.pair] for name in stack.names])  # (L, G, k)
            ranks = kept.sum(dim=-1)  # (L, G)
            if not keeps_leading(kept, ranks, stack.s):
                continue
            if id(stack) not in self._ragged:
                self._ragged[id(stack)] = _RaggedStack(stack)
            for name, columns in self._ragged[id(stack)].update(ranks).items():
                prepared.setdefault(name, {})[stack.pair] = columns
        return prepared

    def _module(self, name: str, md: ModuleDecomposition) -> tuple[nn.Module, dict[str, int]]:
        """The slider's attention module ``name`` (built on first use) and its parameters per direction."""
        held = self._modules.get(name)
        if held is None:
            original = self.dec.model.get_submodule(name)
            with no_init_weights():
                module = md.adapter.pruned(original, {}, share=True).train(original.training)
            adopt_config(module, self.dec.model, self.model)
            set_submodule(self.model, name, module)
            held = self._modules[name] = module, md.adapter.params_per_direction(module)
        return held


class _RaggedStack:
    """A :class:`FactorStack`'s factors with every head's columns past its rank zeroed on one side of
    the pair, up to its layer's width, kept up to date in place; its modules' kept columns are views.

    Zeroing one side is enough: a direction whose column is zero on either side adds nothing, whatever
    the other side holds, so every head's product is exact. The zeroed side is the narrower one (its rows
    are what a move copies); the other side is a view of the stack's factors, never written. Only the
    columns a module reads are kept exact: below each head's rank, the factor's; from there up to its
    layer's width (the largest rank), zeros; past the width, whatever was there (left as the factor's).
    So a move rewrites only columns whose zeroing changed, not every column a rank crossed."""

    def __init__(self, stack: FactorStack):
        self.stack = stack
        narrow_a = stack.a.shape[-1] <= stack.b.shape[-1]  # a (L, k, G, m), b (L, k, G, n)
        self.source = stack.a if narrow_a else stack.b
        self.buffer = self.source.clone()  # every rank full: nothing zeroed
        self.factors = (self.buffer, stack.b) if narrow_a else (stack.a, self.buffer)
        layers, groups, k = stack.s.shape
        self.ranks = torch.full((layers, groups), k, dtype=torch.long, device=stack.s.device)  # (L, G)
        self.zero = self.zeroed(self.ranks)  # the rows zeroed now (none)
        self.views: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (module, width) -> views

    def zeroed(self, ranks: torch.Tensor) -> torch.Tensor:
        """Which rows ``(l, j, g)`` of the stack are zero at ``ranks`` (``(L, G)``): from each head's rank
        up to its layer's width (:func:`padded_width`), flattened like the stack's rows."""
        column = torch.arange(self.buffer.shape[1], device=ranks.device)[None, :, None]  # (1, k, 1)
        width = ranks.amax(dim=1).clamp_min(1)[:, None, None]  # (L, 1, 1)
        return ((column >= ranks[:, None, :]) & (column < width)).flatten()

    def update(self, ranks: torch.Tensor) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor], list[int]]]:
        """Set every head's rank (``(L, G)``): only rows whose zeroing changed are written, one gather and
        one fill for the whole stack. Returns each module's kept columns, padded to its width (views made
        once per module and width), and its ranks."""
        after = self.zeroed(ranks)
        copy, zero = (self.zero & ~after).nonzero().squeeze(1), (after & ~self.zero).nonzero().squeeze(1)
        rows, source = self.buffer.flatten(0, 2), self.source.flatten(0, 2)
        rows.index_copy_(0, copy, source.index_select(0, copy))
        rows.index_fill_(0, zero, 0)
        self.ranks, self.zero = ranks, after
        views = {}
        for layer, (name, heads) in enumerate(zip(self.stack.names, ranks.tolist())):
            width = padded_width(heads)
            kept = self.views.get((name, width))
            if kept is None:
                kept = self.views[name, width] = tuple(t[layer].permute(1, 2, 0)[..., :width] for t in self.factors)
            views[name] = kept, heads
        return views


def _same_tensors(held: dict[str, tuple[torch.Tensor, ...]], new: dict[str, tuple[torch.Tensor, ...]]) -> bool:
    return held.keys() == new.keys() and all(x is y for p in new for x, y in zip(held[p], new[p]))
