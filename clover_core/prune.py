"""Ratio or threshold -> kept directions per head (the plan); CLOVER and vanilla scoring; the pruned
modules built physically smaller (the slider, :mod:`.slider`, re-points them in place instead).

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

from .architectures import Adapter, padded_width
from .architectures.base import set_attributes
from .calibrate import CalibrationStats
from .decompose import PAIRS, Decomposition, ModuleDecomposition, decompose
from .record import pruning_meta, record

log = logging.getLogger(__name__)

Target = Literal["qk", "vo", "both"]
Method = Literal["clover", "vanilla"]
Mode = Literal["uniform", "global", "threshold"]
Allocation = Literal["raw", "normalized"]


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; validated on construction.

    ``ratio`` (in [0, 1)) drives the ``uniform`` and ``global`` modes, ``threshold`` (>= 0) the
    ``threshold`` mode; giving the one a mode does not use is an error, not silently ignored.
    ``allocation`` (``global`` mode only): ``"raw"`` ranks every head's scores as they are (the paper);
    ``"normalized"`` divides them by their module's root-mean-square score first, so layers whose
    weights (or activations) have other scales are compared like with like.
    """

    ratio: float | None = None
    target: Target = "qk"
    method: Method = "clover"
    mode: Mode = "uniform"
    threshold: float | None = None
    allocation: Allocation = "raw"

    def __post_init__(self) -> None:
        for arg, allowed in (("target", Target), ("method", Method), ("mode", Mode), ("allocation", Allocation)):
            value = getattr(self, arg)
            if value not in get_args(allowed):
                raise ValueError(f"{arg}={value!r} is not supported; choose one of {', '.join(get_args(allowed))}")
        if self.allocation != "raw" and self.mode != "global":
            raise ValueError(f"allocation={self.allocation!r} is only used with mode='global' (mode is {self.mode!r})")
        if self.mode == "threshold":
            if self.ratio is not None:
                raise ValueError(f"ratio={self.ratio!r} is not used in mode='threshold'; pass threshold= only")
            _check_number("threshold", self.threshold, "a singular value >= 0, e.g. 5e-3")
            if self.threshold < 0:
                raise ValueError(f"threshold={self.threshold!r} must be >= 0")
        else:
            if self.threshold is not None:
                raise ValueError(
                    f"threshold={self.threshold!r} is only used with mode='threshold' "
                    f"(mode is {self.mode!r}); pass ratio= instead"
                )
            if self.ratio is None:
                raise ValueError(
                    f"ratio is required with mode={self.mode!r}: pass the fraction of directions to "
                    "remove, e.g. ratio=0.5 (or mode='threshold' with threshold=)"
                )
            _check_number("ratio", self.ratio, "a fraction in [0, 1), e.g. 0.5")
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(
                    f"ratio={self.ratio!r} is out of range; it must be in [0, 1) (the fraction of directions removed)"
                )

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
        order = (
            dec.ranking(pair, score, normalized=config.allocation == "normalized") if config.mode == "global" else None
        )
        for name, kept in _keep(scores, config, order).items():
            masks[name][pair] = kept
    return masks


def check_pairs(dec: Decomposition, config: PruneConfig) -> None:
    """Raise ValueError when ``config`` targets a pair the model does not have (Q-K of a rotary model)."""
    for pair in config.pairs:
        if pair not in dec.pair_types:
            raise ValueError(
                f"target={config.target!r} includes {pair!r}, which this model does not have: "
                "rotary position embeddings (Llama family) sit between W_q and W_k, so the Q-K "
                "product is not a fixed matrix and cannot be orthogonalized; use target='vo'"
            )


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


def prune(
    model_or_dec: nn.Module | Decomposition,
    ratio: float | None = None,
    target: Target = "qk",
    method: Method = "clover",
    mode: Mode = "uniform",
    threshold: float | None = None,
    *,
    share_weights: bool = False,
    calibration: CalibrationStats | None = None,
    allocation: Allocation = "raw",
) -> nn.Module:
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
        calibration: statistics from :func:`clover_core.calibrate` (data-aware scores for both methods;
            see :func:`clover_core.decompose`), for a model; a decomposition carries its own.
        allocation: in ``global`` mode, ``"raw"`` (the paper) or ``"normalized"`` (each module's scores
            over their root mean square, see :class:`PruneConfig`).

    Returns:
        The pruned model; ``model.config.clover`` records the method, every head's kept rank and the
        calibration.

    Raises:
        ValueError: an argument outside what is allowed, or ``ratio`` missing in modes ``uniform`` and
            ``global`` (the message names it).
        NotImplementedError: the model has no supported attention module.
    """
    config = PruneConfig(
        ratio=ratio, target=target, method=method, mode=mode, threshold=threshold, allocation=allocation
    )
    if isinstance(model_or_dec, Decomposition):
        if calibration is not None and calibration is not model_or_dec.calibration:
            raise ValueError(
                "calibration= goes with a model; this decomposition was made with other statistics (or "
                "none): decompose(model, calibration=stats) once and prune that"
            )
        dec = model_or_dec
    else:
        dec = decompose(_as_model(model_or_dec), rank_major=share_weights, calibration=calibration)
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
    new = copy_outside_attention(dec, share=share_weights)
    ranks: dict[str, dict[str, list[int]]] = {}
    with torch.no_grad():
        for name, md in dec.modules.items():
            originals = functools.partial(dec.original, name) if share_weights else None
            module = prune_module(
                model.get_submodule(name), md, masks[name], config.method, share=share_weights, originals=originals
            )
            adopt_config(module, model, new)
            set_submodule(new, name, module)
            ranks[name] = module.clover_ranks
    record(new, pruning_meta(model, config, ranks, calibration=dec.calibration))
    log.info("pruned %d attention modules (%s, %s, %s)", len(ranks), config.method, config.mode, config.target)
    return new


def copy_outside_attention(dec: Decomposition, *, share: bool) -> nn.Module:
    """A copy of ``dec.model`` without its attention modules (the caller puts pruned ones in their place);
    ``share`` reuses every parameter and buffer instead of copying it."""
    model = dec.model
    memo = {id(model.get_submodule(name)): None for name in dec.modules}
    if share:  # deepcopy returns what its memo already holds: the very same tensors
        memo.update({id(t): t for t in itertools.chain(model.parameters(), model.buffers())})
    return copy.deepcopy(model, memo)


def adopt_config(module: nn.Module, original: nn.Module, new: nn.Module) -> None:
    """A rebuilt module that read its settings (e.g. the attention implementation) from the original
    model's config reads them from the new model's, like every module the copy made."""
    if getattr(module, "config", None) is getattr(original, "config", None) is not None:
        module.config = new.config


def prune_module(
    original: nn.Module,
    md: ModuleDecomposition,
    masks: dict[str, torch.Tensor],
    method: str,
    *,
    share: bool = False,
    originals: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
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


def select_pairs(
    md: ModuleDecomposition,
    masks: dict[str, Selection],
    method: str,
    originals: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    prepared: Prepared | None = None,
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


def build_module(
    template: nn.Module,
    adapter: Adapter,
    selected: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ranks: dict[str, list[int]],
    *,
    share: bool = False,
) -> nn.Module:
    """A pruned module like ``template`` holding the ``selected`` factors, with ``ranks`` attached;
    ``share`` builds the rank-major layout, whose weights are views of the factors (see :func:`prune`)."""
    with no_init_weights():  # every weight is written by load_factors: skip the random initialization
        module = adapter.pruned(template, {p: padded_width(r) for p, r in ranks.items()}, share=share)
    adapter.load_factors(module, selected, share=share)
    attach_ranks(module, adapter, ranks)
    return module.train(template.training)


def select_columns(
    a: torch.Tensor, b: torch.Tensor, score: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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
    if keeps_leading(kept, ranks, score):
        return zero_padding(a[..., :width], b[..., :width], ranks)  # (G, m, w), (G, n, w)
    order = torch.argsort(score.masked_fill(~kept, -math.inf), dim=1, descending=True, stable=True)[:, :width]
    idx = order.to(a.device)[:, None, :]  # (G, 1, w)
    return zero_padding(a.gather(2, idx.expand(-1, a.shape[1], -1)), b.gather(2, idx.expand(-1, b.shape[1], -1)), ranks)


def zero_padding(
    a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor | list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` ``(G, m, w)`` and ``b`` ``(G, n, w)`` with each group's columns past ``ranks[g]`` zeroed on
    both sides (new tensors), or the very same tensors when every group keeps all ``w``."""
    ranks = torch.as_tensor(ranks, device=a.device)
    if (ranks == a.shape[-1]).all():
        return a, b
    live = (torch.arange(a.shape[-1], device=a.device)[None] < ranks[:, None]).to(a)[:, None, :]  # (G, 1, w)
    return a * live, b * live


def keeps_leading(kept: torch.Tensor, ranks: torch.Tensor, score: torch.Tensor) -> bool:
    """Whether each group keeps exactly its first ``ranks[..., g]`` columns and they are ordered best
    first (``kept``/``score`` ``(..., G, k)``, ``ranks`` ``(..., G)``)."""
    first = torch.arange(kept.shape[-1], device=kept.device) < ranks[..., None]  # (..., G, k)
    return bool(torch.equal(kept, first) and (score[..., :-1] >= score[..., 1:]).all())


def attach_ranks(
    module: nn.Module, adapter: Adapter, ranks: dict[str, list[int]], per_direction: dict[str, int] | None = None
) -> None:
    """Record true per-head ranks on a pruned module, with the padding and KV width they imply
    (``per_direction``: the adapter's ``params_per_direction(module)``, when known)."""
    per_direction = per_direction or adapter.params_per_direction(module)
    padding = sum((len(r) * padded_width(r) - sum(r)) * per_direction[p] for p, r in ranks.items())
    set_attributes(module, clover_ranks=ranks, clover_padding=padding)
    kv = adapter.kv_width(module, ranks)
    if kv is not None:
        set_attributes(module, kv_width=kv[0], kv_width_allocated=kv[1])


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``setattr`` on the parent of the dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
