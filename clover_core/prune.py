"""Ratio or threshold -> kept directions per head; CLOVER and vanilla scoring; physical rebuilding.

CLOVER keeps the top singular directions of each head's orthogonalized pair (the best rank-r
approximation of the head's product); vanilla keeps the original head dimensions with the largest
``||a_i|| * ||b_i||``. Both are cut to the same sizes, so every comparison is at equal cost.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .adapters import Adapter
from .adapters.base import set_attributes
from .attention import padded_width
from .decompose import PAIRS, Decomposition, FactorStack, ModuleDecomposition, decompose
from .model_card import origin

log = logging.getLogger(__name__)

Target = Literal["qk", "vo", "both"]
Method = Literal["clover", "vanilla"]
Mode = Literal["uniform", "global", "threshold"]
FORMAT = "clover-studio/1"


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; validated on construction.

    ``ratio`` (in [0, 1)) drives the ``uniform`` and ``global`` modes, ``threshold`` (>= 0) the
    ``threshold`` mode; giving the one a mode does not use is an error, not silently ignored.
    """

    ratio: float | None = None
    target: Target = "qk"
    method: Method = "clover"
    mode: Mode = "uniform"
    threshold: float | None = None

    def __post_init__(self) -> None:
        for arg, allowed in (("target", Target), ("method", Method), ("mode", Mode)):
            value = getattr(self, arg)
            if value not in get_args(allowed):
                raise ValueError(f"{arg}={value!r} is not supported; choose one of {', '.join(get_args(allowed))}")
        if self.mode == "threshold":
            if self.ratio is not None:
                raise ValueError(f"ratio={self.ratio!r} is not used in mode='threshold'; pass threshold= only")
            _check_number("threshold", self.threshold, "a singular value >= 0, e.g. 5e-3")
            if self.threshold < 0:
                raise ValueError(f"threshold={self.threshold!r} must be >= 0")
        else:
            if self.threshold is not None:
                raise ValueError(f"threshold={self.threshold!r} is only used with mode='threshold' "
                                 f"(mode is {self.mode!r}); pass ratio= instead")
            _check_number("ratio", self.ratio, "a fraction in [0, 1), e.g. 0.5")
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio={self.ratio!r} is out of range; it must be in [0, 1) "
                                 "(the fraction of directions removed)")

    @property
    def pairs(self) -> tuple[str, ...]:
        """The pair types this config prunes."""
        return PAIRS if self.target == "both" else (self.target,)


def _check_number(arg: str, value: object, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{arg}={value!r} is not valid; expected {expected}")


Plan = dict[str, dict[str, torch.Tensor]]  # module name -> pair -> (G, head_dim) bool "kept" mask


def plan(dec: Decomposition, config: PruneConfig) -> Plan:
    """Which directions each head keeps, for the pairs ``config`` targets (no SVD).

    Args:
        dec: a cached decomposition.
        config: the validated pruning request.

    Returns:
        ``{module: {pair: kept mask (G, head_dim)}}`` for every targeted pair.

    Raises:
        ValueError: the target asks for a pair the model does not have (Q-K of a rotary model).
    """
    check_pairs(dec, config)
    masks: Plan = {name: {} for name in dec.modules}
    score = "s" if config.method == "clover" else "vanilla"
    for pair in config.pairs:
        scores = {name: getattr(md.pairs[pair], score) for name, md in dec.modules.items()}
        order = dec.ranking(pair, score) if config.mode == "global" else None
        for name, kept in _keep(scores, config, order).items():
            masks[name][pair] = kept
    return masks


def check_pairs(dec: Decomposition, config: PruneConfig) -> None:
    """Raise ValueError when ``config`` targets a pair the model does not have (Q-K of a rotary model)."""
    for pair in config.pairs:
        if pair not in dec.pair_types:
            raise ValueError(f"target={config.target!r} includes {pair!r}, which this model does not have: "
                             "rotary position embeddings (Llama family) sit between W_q and W_k, so the Q-K "
                             "product is not a fixed matrix and cannot be orthogonalized; use target='vo'")


def _keep(scores: dict[str, torch.Tensor], config: PruneConfig, order: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Kept masks per module; ``order`` (global mode) ranks every score, weakest first."""
    if config.mode == "threshold":
        return {name: s > config.threshold for name, s in scores.items()}
    if config.mode == "uniform":
        return {name: _top_r(s, round(s.shape[1] * (1 - config.ratio))) for name, s in scores.items()}
    removed = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    removed[order[: round(config.ratio * order.numel())]] = True
    kept = (~removed).split([s.numel() for s in scores.values()])
    return {name: k.view_as(s) for (name, s), k in zip(scores.items(), kept)}


def _top_r(scores: torch.Tensor, r: int) -> torch.Tensor:
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept.scatter_(1, torch.argsort(scores, dim=1, descending=True, stable=True)[:, :r], True)
    return kept


def prune(model_or_dec: nn.Module | Decomposition, ratio: float | None = None, target: Target = "qk",
          method: Method = "clover", mode: Mode = "uniform", threshold: float | None = None, *,
          share_weights: bool = False) -> nn.Module:
    """A new, physically smaller model; the input model is left untouched.

    Args:
        model_or_dec: a model, or a cached :class:`Decomposition` (then no SVD is run).
        ratio: fraction of directions to remove, in [0, 1) (modes ``uniform`` and ``global``).
        target: ``"qk"``, ``"vo"`` or ``"both"`` (pruned independently).
        method: ``"clover"`` (orthogonalized) or ``"vanilla"`` (original head dimensions).
        mode: ``"uniform"`` (every head keeps ``round(head_dim * (1 - ratio))``), ``"global"`` (one
            ``ratio``-quantile threshold over all heads and layers) or ``"threshold"``.
        threshold: absolute score threshold for ``mode="threshold"``; directions with a score
            ``<= threshold`` are removed.
        share_weights: reuse, instead of copying, every parameter and buffer outside the attention
            modules (embeddings, MLPs, norms). Re-pruning from a cached decomposition then costs no
            copy of the model and no extra memory, but the pruned model and the original hold the
            same tensors, and the kept CLOVER weights are views of the decomposition's factors (the
            attention modules then lay their projections out rank-major, like :class:`Slider`'s;
            ``save_pruned`` writes the usual head-major layout): use it for read-only work
            (evaluation); training or editing either model in place would change both. For an
            interactive ratio slider, :class:`Slider` also reuses the model object.

    Returns:
        The pruned model; ``model.config.clover`` records the method and every head's kept rank.

    Raises:
        ValueError: an argument outside what is allowed (the message names it).
        NotImplementedError: the model has no supported attention module.
    """
    if ratio is None and mode != "threshold":
        ratio = 0.0
    config = PruneConfig(ratio=ratio, target=target, method=method, mode=mode, threshold=threshold)
    dec = (model_or_dec if isinstance(model_or_dec, Decomposition)
           else decompose(_as_model(model_or_dec), rank_major=share_weights))
    return build(dec, plan(dec, config), config, share_weights=share_weights)


def _as_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch model or a Decomposition, got {type(model).__name__}")
    return model


def build(dec: Decomposition, masks: Plan, config: PruneConfig, *, share_weights: bool = False) -> nn.Module:
    """Copy ``dec.model`` with every attention module rebuilt to keep only the directions in ``masks``;
    ``share_weights`` reuses the other modules' tensors instead of copying them (see :func:`prune`)."""
    model = dec.model
    if share_weights:
        dec.use_rank_major()  # the kept CLOVER weights become slices of the factors
    new = _copy_outside_attention(dec, share=share_weights)
    ranks: dict[str, dict[str, list[int]]] = {}
    with torch.no_grad():
        for name, md in dec.modules.items():
            originals = functools.partial(dec.original, name) if share_weights else None
            module = prune_module(model.get_submodule(name), md, masks[name], config.method, share=share_weights,
                                  originals=originals)
            _adopt_config(module, model, new)
            set_submodule(new, name, module)
            ranks[name] = module.clover_ranks
    record(new, pruning_meta(model, config, ranks))
    log.info("pruned %d attention modules (%s, %s, %s)", len(ranks), config.method, config.mode, config.target)
    return new


def _copy_outside_attention(dec: Decomposition, *, share: bool) -> nn.Module:
    """A copy of ``dec.model`` without its attention modules (the caller puts pruned ones in their place);
    ``share`` reuses every parameter and buffer instead of copying it."""
    model = dec.model
    memo = {id(model.get_submodule(name)): None for name in dec.modules}
    if share:  # deepcopy returns what its memo already holds: the very same tensors
        memo.update({id(t): t for t in itertools.chain(model.parameters(), model.buffers())})
    return copy.deepcopy(model, memo)


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
        self.model = _copy_outside_attention(dec, share=True)  # attention modules built on first use
        self._modules: dict[str, tuple[nn.Module, dict[str, int]]] = {}
        self._ragged: dict[int, _RaggedStack] = {}  # per FactorStack, made on first use
        self._loaded: dict[str, tuple[dict, dict]] = {}  # module -> (factors it holds, its ranks)
        self._base = origin(dec.model, pruning_record(dec.model))

    def __call__(self, ratio: float | None = None, target: Target = "qk", mode: Mode = "uniform",
                 threshold: float | None = None) -> nn.Module:
        """The model pruned to ``ratio`` (or ``threshold``); arguments as in :func:`prune`.

        Raises:
            ValueError: an argument outside what is allowed (the message names it).
        """
        if ratio is None and mode != "threshold":
            ratio = 0.0
        config = PruneConfig(ratio=ratio, target=target, method=self.method, mode=mode, threshold=threshold)
        if self.method == "clover" and mode == "uniform":
            masks = _first_r(self.dec, config)
        else:
            masks = plan(self.dec, config)
        ranks: dict[str, dict[str, list[int]]] = {}
        with torch.no_grad():
            ragged = self._ragged_columns(masks, config) if self.method == "clover" and mode != "uniform" else {}
            for name, md in self.dec.modules.items():
                selected, ranks[name] = select_pairs(md, masks[name], self.method,
                                                     functools.partial(self.dec.original, name), ragged.get(name))
                held = self._loaded.get(name)
                current = held is not None and _same_tensors(held[0], selected)  # the views it holds
                if current and held[1] == ranks[name]:
                    continue  # its heads kept their ranks
                module, per_direction = self._module(name, md)
                if not current:  # (a buffer updated in place at the same width needs no re-pointing)
                    md.adapter.load_factors(module, selected, share=True)
                attach_ranks(module, md.adapter, ranks[name], per_direction)
                self._loaded[name] = selected, ranks[name]
        record(self.model, pruning_meta(self.dec.model, config, ranks, base=self._base))
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
            if not _leading(kept, ranks, stack.s):
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
            _adopt_config(module, self.dec.model, self.model)
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


def _adopt_config(module: nn.Module, original: nn.Module, new: nn.Module) -> None:
    """A rebuilt module that read its settings (e.g. the attention implementation) from the original
    model's config reads them from the new model's, like every module the copy made."""
    if getattr(module, "config", None) is getattr(original, "config", None) is not None:
        module.config = new.config


def pruning_meta(model: nn.Module, config: PruneConfig, ranks: dict[str, dict[str, list[int]]], *,
                 base: dict | None = None) -> dict:
    """The ``clover`` record of ``model`` pruned by ``config`` to ``ranks``, with the base model and
    its sizes before pruning (for the model card; ``base`` when already computed for ``model``)."""
    base = origin(model, pruning_record(model)) if base is None else base
    return {"format": FORMAT, "method": config.method, "mode": config.mode, "target": config.target,
            "ratio": config.ratio, "threshold": config.threshold, "ranks": ranks, **base}


def prune_module(original: nn.Module, md: ModuleDecomposition, masks: dict[str, torch.Tensor],
                 method: str, *, share: bool = False,
                 originals: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """One attention module rebuilt smaller: the directions ``masks`` keeps, per pair (no SVD).

    Args:
        original: the module as it is in the model; md: its decomposition.
        masks: ``{pair: kept mask (G, head_dim)}`` for the pruned pairs (others are kept whole).
        method: ``"clover"`` (rotated factors) or ``"vanilla"`` (original columns).
        share: reuse the original's untouched tensors and make the kept weights views of the factors.
        originals: ``pair -> (a, b)``, the original factors when they are at hand (a Decomposition caches
            them rank-major: see :meth:`Decomposition.original`); read from ``original`` otherwise.

    Returns:
        The new module, with ``clover_ranks`` and the sizes they imply attached.
    """
    if originals is None:
        factors = functools.cache(lambda: md.adapter.factors(original))  # read once, only if needed
        originals = lambda pair: factors()[pair]  # noqa: E731
    selected, ranks = select_pairs(md, masks, method, originals)
    return build_module(original, md.adapter, selected, ranks, share=share)


Selection = int | torch.Tensor  # a kept mask (G, head_dim), or r: every head keeps its first r directions


Prepared = dict[str, tuple[tuple[torch.Tensor, torch.Tensor], list[int]]]  # pair -> (kept factors, ranks)


def select_pairs(md: ModuleDecomposition, masks: dict[str, Selection], method: str,
                 originals: Callable[[str], tuple[torch.Tensor, torch.Tensor]], prepared: Prepared | None = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]]]:
    """The kept, zero-padded columns of every pair of one module, and each head's rank (no SVD).

    Args:
        md: the module's decomposition.
        masks: ``{pair: selection}`` for the pruned pairs; the others are kept whole. An integer ``r``
            (CLOVER at a uniform ratio) keeps every head's first ``r`` rotated columns: a slice.
        method: ``"clover"`` (rotated factors) or ``"vanilla"`` (original columns).
        originals: ``pair -> (a, b)``, the original factors (vanilla, and pairs kept whole).
        prepared: pairs whose kept columns and ranks are already at hand (a :class:`Slider` keeps
            CLOVER's ragged ones in buffers it updates in place); the others are selected here.

    Returns:
        ``({pair: (a_kept, b_kept)}, {pair: ranks})``.
    """
    selected, ranks = {}, {}
    for pair, pd in md.pairs.items():
        if prepared and pair in prepared:
            selected[pair], ranks[pair] = prepared[pair]
            continue
        kept = masks.get(pair)
        if isinstance(kept, int) and kept > 0:
            selected[pair], ranks[pair] = (pd.a[..., :kept], pd.b[..., :kept]), [kept] * pd.s.shape[0]
            continue
        if isinstance(kept, int):  # r = 0: nothing kept
            kept = torch.zeros_like(pd.s, dtype=torch.bool)
        if kept is not None and method == "clover":
            selected[pair] = select_columns(pd.a, pd.b, pd.s, kept)
        else:  # vanilla, or a pair left whole: the original columns
            kept = torch.ones_like(pd.vanilla, dtype=torch.bool) if kept is None else kept
            selected[pair] = select_columns(*originals(pair), pd.vanilla, kept)
        ranks[pair] = kept.sum(dim=1).tolist()
    return selected, ranks


def _first_r(dec: Decomposition, config: PruneConfig) -> dict[str, dict[str, Selection]]:
    """:func:`plan` for CLOVER at a uniform ratio, without masks: the sorted spectra make every head's
    top ``r`` its first ``r`` columns (the same ``r`` as ``plan``)."""
    check_pairs(dec, config)
    return {name: {pair: round(md.pairs[pair].s.shape[1] * (1 - config.ratio)) for pair in config.pairs}
            for name, md in dec.modules.items()}


def build_module(template: nn.Module, adapter: Adapter, selected: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 ranks: dict[str, list[int]], *, share: bool = False) -> nn.Module:
    """A pruned module like ``template`` holding the ``selected`` factors, with ``ranks`` attached;
    ``share`` builds the rank-major layout, whose weights are views of the factors (see :func:`prune`)."""
    with no_init_weights():  # every weight is written by load_factors: skip the random initialization
        module = adapter.pruned(template, {p: padded_width(r) for p, r in ranks.items()}, share=share)
    adapter.load_factors(module, selected, share=share)
    attach_ranks(module, adapter, ranks)
    return module.train(template.training)


def select_columns(a: torch.Tensor, b: torch.Tensor, score: torch.Tensor,
                   kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each group's kept columns (best first), zero-padded to a common width.

    Args:
        a: ``(G, m, k)``; b: ``(G, n, k)``; score: ``(G, k)``; kept: ``(G, k)`` bool.

    Returns:
        ``(a_kept, b_kept)`` of shapes ``(G, m, w)`` and ``(G, n, w)``, ``w = padded_width(ranks)``.
        A pair that keeps every direction comes back as it is, in its original column order; when
        the kept columns are already the leading ones, best first (CLOVER's sorted spectra), the
        result is a view, and nothing is gathered.
    """
    if kept.all():
        return a, b
    ranks = kept.sum(dim=1)  # (G,)
    width = padded_width(ranks.tolist())
    if _leading(kept, ranks, score):
        return zero_padding(a[..., :width], b[..., :width], ranks)  # (G, m, w), (G, n, w)
    order = torch.argsort(score.masked_fill(~kept, -math.inf), dim=1, descending=True, stable=True)[:, :width]
    idx = order.to(a.device)[:, None, :]  # (G, 1, w)
    return zero_padding(a.gather(2, idx.expand(-1, a.shape[1], -1)), b.gather(2, idx.expand(-1, b.shape[1], -1)), ranks)


def zero_padding(a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` ``(G, m, w)`` and ``b`` ``(G, n, w)`` with each group's columns past ``ranks[g]`` zeroed on
    both sides (new tensors), or the very same tensors when every group keeps all ``w``."""
    ranks = torch.as_tensor(ranks, device=a.device)
    if (ranks == a.shape[-1]).all():
        return a, b
    live = (torch.arange(a.shape[-1], device=a.device)[None] < ranks[:, None]).to(a)[:, None, :]  # (G, 1, w)
    return a * live, b * live


def _leading(kept: torch.Tensor, ranks: torch.Tensor, score: torch.Tensor) -> bool:
    """Whether each group keeps exactly its first ``ranks[..., g]`` columns and they are ordered best
    first (``kept``/``score`` ``(..., G, k)``, ``ranks`` ``(..., G)``)."""
    first = torch.arange(kept.shape[-1], device=kept.device) < ranks[..., None]  # (..., G, k)
    return bool(torch.equal(kept, first) and (score[..., :-1] >= score[..., 1:]).all())


def attach_ranks(module: nn.Module, adapter: Adapter, ranks: dict[str, list[int]],
                 per_direction: dict[str, int] | None = None) -> None:
    """Record true per-head ranks on a pruned module, with the padding and KV width they imply
    (``per_direction``: the adapter's ``params_per_direction(module)``, when known)."""
    per_direction = per_direction or adapter.params_per_direction(module)
    padding = sum((len(r) * padded_width(r) - sum(r)) * per_direction[p] for p, r in ranks.items())
    set_attributes(module, clover_ranks=ranks, clover_padding=padding)
    kv = adapter.kv_width(module, ranks)
    if kv is not None:
        set_attributes(module, kv_width=kv[0], kv_width_allocated=kv[1])


def record(model: nn.Module, meta: dict) -> None:
    """Store the pruning record in the model's config (diffusers configs are frozen: registered)."""
    if hasattr(model, "register_to_config"):
        model.register_to_config(clover=meta)
    else:
        model.config.clover = meta


def pruning_record(model: nn.Module) -> dict | None:
    """The ``clover`` entry of a pruned model's config, or None for a model that was not pruned."""
    config = getattr(model, "config", None)
    meta = config.get("clover") if isinstance(config, dict) else getattr(config, "clover", None)
    return meta if isinstance(meta, dict) else None


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``setattr`` on the parent of the dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
