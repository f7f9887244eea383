"""Per-head summaries of a decomposition, laid out as a grid (attention module x head) for display.

How concentrated a head's singular values are says how prunable it is: a head whose energy sits in
a few directions loses little when the rest are dropped. Everything here reads a cached
:class:`~clover_core.decompose.Decomposition` and a pruning plan; no SVD is ever run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clover_core.decompose import Decomposition
from clover_core.prune import Mode, PruneConfig, Target, plan

TOP_FRACTION = 0.25  # the share of directions whose energy the heatmap shows


@dataclass(frozen=True)
class HeadGrid:
    """One pair type (``qk`` or ``vo``) of every attention module, as ``(modules, heads)`` arrays.

    Modules with fewer heads than the widest one are padded with NaN (kept ranks with -1).

    Attributes:
        pair: ``"qk"`` or ``"vo"``.
        modules: attention module names, one per row.
        energy: share of each head's energy (sum of squared singular values) in its top
            ``TOP_FRACTION`` of directions, in [0, 1].
        effective_rank: ``exp`` of the entropy of the normalized singular values (Roy & Vetterli 2007).
        kept: directions each head keeps under the plan, or its full width when the pair is not pruned.
        head_dim: directions per head (the widest module's).
        singular_values: ``{module: (heads, head_dim)}`` float32 tensors, descending.
    """

    pair: str
    modules: list[str]
    energy: np.ndarray
    effective_rank: np.ndarray
    kept: np.ndarray
    head_dim: int
    singular_values: dict[str, torch.Tensor]


def energy_share(s: torch.Tensor, top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Share of each row's energy in its top ``ceil(top_fraction * width)`` values.

    Args:
        s: ``(heads, width)`` singular values, each row descending.
        top_fraction: in (0, 1].

    Returns:
        ``(heads,)`` shares in [0, 1]; NaN for a head whose values are all zero.

    Raises:
        ValueError: ``top_fraction`` outside (0, 1].
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction!r} must be in (0, 1]")
    energy = s.double().pow(2)
    top = max(1, math.ceil(top_fraction * s.shape[1]))
    total = energy.sum(dim=1)
    return (energy[:, :top].sum(dim=1) / total).where(total > 0, torch.nan).float()


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """``exp(entropy(s / sum(s)))`` of each row: 1 for one direction, the width for a flat spectrum.

    Args:
        s: ``(heads, width)`` non-negative singular values.

    Returns:
        ``(heads,)`` effective ranks; NaN for a head whose values are all zero.
    """
    s = s.double().clamp_min(0)
    total = s.sum(dim=1, keepdim=True)
    p = s / total
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    return entropy.exp().where(total[:, 0] > 0, torch.nan).float()


def kept_ranks(
    dec: Decomposition, ratio: float, target: Target, mode: Mode, method: str = "clover"
) -> dict[str, dict[str, list[int]]]:
    """Directions each head keeps at this setting, ``{pair: {module: [rank per head]}}`` (no SVD).

    Pairs the target leaves alone keep every direction.

    Raises:
        ValueError: an invalid setting, or a target the model does not have (Q-K of a rotary model).
    """
    config = PruneConfig(ratio=ratio, target=target, method=method, mode=mode)
    masks = plan(dec, config)
    ranks: dict[str, dict[str, list[int]]] = {pair: {} for pair in dec.pair_types}
    for name, md in dec.modules.items():
        for pair in dec.pair_types:
            kept = masks[name].get(pair)
            width = md.pairs[pair].s.shape
            ranks[pair][name] = kept.sum(dim=1).tolist() if kept is not None else [width[1]] * width[0]
    return ranks


def cut_score(dec: Decomposition, ratio: float, target: Target, mode: Mode) -> dict[str, float | None]:
    """The largest CLOVER singular value removed, per pruned pair type (the global threshold line).

    Returns:
        ``{pair: value}``; None where nothing is removed or the pair is not pruned.
    """
    config = PruneConfig(ratio=ratio, target=target, method="clover", mode=mode)
    masks = plan(dec, config)
    cuts: dict[str, float | None] = {}
    for pair in dec.pair_types:
        removed = [md.pairs[pair].s[~masks[name][pair]] for name, md in dec.modules.items() if pair in masks[name]]
        flat = torch.cat(removed) if removed else torch.empty(0)
        cuts[pair] = float(flat.max()) if flat.numel() else None
    return cuts


def head_grid(dec: Decomposition, pair: str, ranks: dict[str, list[int]] | None = None) -> HeadGrid:
    """The summaries of one pair type of every module (see :class:`HeadGrid`).

    Args:
        dec: a cached decomposition.
        pair: ``"qk"`` or ``"vo"``.
        ranks: ``{module: [kept rank per head]}`` from :func:`kept_ranks`; default: nothing pruned.

    Raises:
        ValueError: the model has no such pair (Q-K of a rotary model).
    """
    if pair not in dec.pair_types:
        raise ValueError(f"pair={pair!r} is not available for this model; it has {', '.join(dec.pair_types)}")
    values = {name: md.pairs[pair].s for name, md in dec.modules.items()}
    rows = len(values)
    heads = max(s.shape[0] for s in values.values())
    energy = np.full((rows, heads), np.nan, dtype=np.float32)
    erank = np.full((rows, heads), np.nan, dtype=np.float32)
    kept = np.full((rows, heads), -1, dtype=np.int64)
    for i, (name, s) in enumerate(values.items()):
        g = s.shape[0]
        energy[i, :g] = energy_share(s.cpu()).numpy()
        erank[i, :g] = effective_rank(s.cpu()).numpy()
        kept[i, :g] = ranks[name] if ranks is not None else s.shape[1]
    return HeadGrid(
        pair,
        list(values),
        energy,
        erank,
        kept,
        max(s.shape[1] for s in values.values()),
        {k: v.detach().cpu() for k, v in values.items()},
    )


def short_names(names: list[str]) -> list[str]:
    """Module names without the dotted prefix they all share (``transformer.h.0.attn`` -> ``h.0.attn``)."""
    if len(names) < 2:
        return [n.rpartition(".")[2] or n for n in names]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common and parts[0][common].isdigit():  # keep the list a layer index belongs to: h.0, not 0
        common -= 1
    return [".".join(p[common:]) for p in parts]


def rank_totals(dec: Decomposition, ranks: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, int]]:
    """Per pair type: directions kept and in total, the smallest and largest head rank, heads emptied.

    Args:
        dec: the decomposition the ranks were planned on.
        ranks: ``{pair: {module: [rank per head]}}`` from :func:`kept_ranks`.
    """
    totals = {}
    for pair, per_module in ranks.items():
        flat = [r for rs in per_module.values() for r in rs]
        totals[pair] = {
            "kept": sum(flat),
            "total": sum(md.pairs[pair].s.numel() for md in dec.modules.values()),
            "min": min(flat),
            "max": max(flat),
            "empty": sum(r == 0 for r in flat),
        }
    return totals
