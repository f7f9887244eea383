"""A model's attention, decomposed: the containers, the walk over its attention modules, spectra.

:func:`decompose` asks the architectures registry for every supported attention module, has its
adapter split each pair into per-head factors and orthogonalizes them (:mod:`.orthogonalize`), and
keeps the results in a :class:`Decomposition` that pruning, the slider and the spectra reuse without
any further SVD. ``rank_major=True`` stores the rotated factors as the slider reads them (stacks of
equal-shaped modules, ``(L, k, G, rows)``), so keeping each head's first ``r`` directions is a slice.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Adapter, attention_modules
from .calibrate import CalibrationStats
from .orthogonalize import NonFiniteFactors, orthogonalize_whitened, orthogonalize_with_scores

log = logging.getLogger(__name__)

PAIRS = ("qk", "vo")


def rank_major_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a ``(G, rows, k)`` tensor stored rank-major (``.permute(2, 0, 1)`` is contiguous)."""
    g, rows, k = t.shape
    return torch.empty(k, g, rows, dtype=t.dtype, device=t.device).permute(1, 2, 0).copy_(t)


@dataclass
class PairDecomposition:
    """One pair type (Q-K or V-O) of one attention module, orthogonalized.

    ``a``/``b`` are the rotated factors in the model's dtype (stored rank-major, ``a.permute(2, 0, 1)``
    contiguous, once :meth:`Decomposition.use_rank_major` ran), ``s`` the singular values (descending)
    and ``vanilla`` the baseline scores of the original, un-rotated columns (both float32).
    """

    a: torch.Tensor  # (G, m, head_dim)
    b: torch.Tensor  # (G, n, head_dim)
    s: torch.Tensor  # (G, head_dim)
    vanilla: torch.Tensor  # (G, head_dim)


@dataclass
class ModuleDecomposition:
    """All pairs of one attention module, with the adapter that knows its layout."""

    name: str
    adapter: Adapter
    pairs: dict[str, PairDecomposition] = field(default_factory=dict)


@dataclass
class Decomposition:
    """A model's attention, orthogonalized once; ``prune`` and ``spectra`` reuse it without any SVD.

    Holds a reference to the (unchanged) model: vanilla pruning reads the original columns from it;
    ``calibration``: the statistics its scores were weighted by (None: data-free).
    """

    model: nn.Module
    modules: dict[str, ModuleDecomposition]
    calibration: CalibrationStats | None = field(default=None, repr=False)
    _originals: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _stacks: list[FactorStack] | None = field(default=None, repr=False)  # set by use_rank_major
    _rankings: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def pair_types(self) -> tuple[str, ...]:
        """The pair types present in every module (``qk`` is absent for rotary models)."""
        present = [set(m.pairs) for m in self.modules.values()]
        return tuple(p for p in PAIRS if all(p in s for s in present))

    def use_rank_major(self) -> None:
        """Store every rotated factor rank-major, like the projections of a model re-pruned in place, so
        that keeping each head's first ``r`` directions is a slice of it (one copy, once; run by
        :class:`~clover_core.Slider` and ``prune(..., share_weights=True)``). The factors of modules
        with equal shapes share one stacked tensor (see :meth:`stacks`). A no-op after
        ``decompose(..., rank_major=True)``, which writes the factors there in the first place;
        plain ``decompose`` writes the GEMM's natural layout."""
        if self._stacks is not None:
            return
        groups = _stack_groups(
            (name, pair, pd.a, pd.b, pd.a.device) for name, md in self.modules.items() for pair, pd in md.pairs.items()
        )
        self._stacks = [
            FactorStack.of(key[0], [(name, self.modules[name].pairs[key[0]]) for name in names])
            for key, names in groups.items()
        ]

    @property
    def stacks(self) -> list[FactorStack]:
        """The rank-major factors, one :class:`FactorStack` per pair type and shape (after
        :meth:`use_rank_major`; empty before)."""
        return self._stacks or []

    def ranking(self, pair: str, score: str, normalized: bool = False) -> torch.Tensor:
        """Every head's directions of ``pair`` in every module, weakest ``score`` first (``"s"`` or
        ``"vanilla"``; a stable sort of the scores flattened in module order), computed once: the
        ``global`` mode's order, which no ratio changes. ``normalized``: each module's scores divided by
        their root mean square first."""
        key = (pair, score, normalized)
        if key not in self._rankings:
            scores = [getattr(md.pairs[pair], score) for md in self.modules.values()]
            if normalized:
                scores = [s / s.square().mean().sqrt().clamp_min(torch.finfo(s.dtype).tiny) for s in scores]
            self._rankings[key] = torch.argsort(torch.cat([s.flatten() for s in scores]), stable=True)
        return self._rankings[key]

    def original(self, name: str, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-rotated factors of one pair of module ``name``, copied once into rank-major storage
        (like the rotated ones) and cached: vanilla pruning and pairs left whole read them."""
        key = (name, pair)
        if key not in self._originals:
            md = self.modules[name]
            a, b = md.adapter.factors(self.model.get_submodule(name))[pair]
            self._originals[key] = rank_major_copy(a), rank_major_copy(b)
        return self._originals[key]


@dataclass
class FactorStack:
    """The rotated factors of one pair type in every module of one shape, stacked rank-major:
    ``a[l].permute(1, 2, 0)`` is module ``names[l]``'s ``(G, m, k)`` factor (its ``PairDecomposition``
    holds that view), so one operation can reach every module's columns at once."""

    pair: str
    names: list[str]
    a: torch.Tensor  # (L, k, G, m), contiguous
    b: torch.Tensor  # (L, k, G, n)
    s: torch.Tensor  # (L, G, k) float32 singular values

    @classmethod
    def empty(
        cls,
        pair: str,
        names: list[str],
        a_shape: torch.Size,
        b_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
    ) -> FactorStack:
        """Uninitialized storage for modules ``names`` whose factors are ``(G, m, k)`` and ``(G, n, k)``;
        ``s`` is filled in by :meth:`of` or :func:`decompose`."""
        a_stack, b_stack = (
            torch.empty(len(names), k, g, rows, dtype=dtype, device=device) for g, rows, k in (a_shape, b_shape)
        )
        return cls(pair, list(names), a_stack, b_stack, torch.empty(0))

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``names[layer]``'s ``(G, m, k)`` and ``(G, n, k)`` factors: views of the stacks."""
        return self.a[layer].permute(1, 2, 0), self.b[layer].permute(1, 2, 0)

    @classmethod
    def of(cls, pair: str, members: list[tuple[str, PairDecomposition]]) -> FactorStack:
        """Copy the members' factors into the stack and point their ``PairDecomposition`` at it."""
        first = members[0][1]
        stack = cls.empty(
            pair, [name for name, _ in members], first.a.shape, first.b.shape, first.a.dtype, first.a.device
        )
        for layer, (_, pd) in enumerate(members):
            views = stack.views(layer)
            for view, t in zip(views, (pd.a, pd.b)):
                view.copy_(t)
            pd.a, pd.b = views
        stack.s = torch.stack([pd.s for _, pd in members])
        return stack


def decompose(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    rank_major: bool = False,
    calibration: CalibrationStats | None = None,
) -> Decomposition:
    """Orthogonalize every supported attention module of ``model`` (the model is not modified).

    Args:
        model: a transformers / diffusers model with supported attention modules.
        dtype: precision of the QR/SVD, ``torch.float32`` (default) or ``torch.float64``.
        progress: show a progress bar over attention modules.
        rank_major: write the rotated factors straight into the rank-major stacks that
            :class:`~clover_core.Slider` and ``prune(..., share_weights=True)`` read (what
            :meth:`Decomposition.use_rank_major` makes afterwards by copying every factor): the same
            decomposition without that copy, or its second set of factors in memory while it runs.
        calibration: activation statistics from :func:`clover_core.calibrate`: each pair's directions
            are then ordered by the error they make on that data (whitened singular values), and
            vanilla's scores weigh each original dimension by its activations. The factors keep the
            model's shapes and the decomposition stays exact at full rank.

    Returns:
        A reusable :class:`Decomposition`.

    Raises:
        NotImplementedError: the model has no supported attention module.
        TypeError: not a torch module, non-floating weights or an unsupported ``dtype``.
        ValueError: weights on the ``meta`` device (not loaded), NaN / inf in an attention module's
            weights (the message names the module and pair), or calibration statistics of another model.
    """
    found = attention_modules(model)
    if calibration is not None and not isinstance(calibration, CalibrationStats):
        raise TypeError(
            f"calibration must come from clover_core.calibrate(model, batches), got {type(calibration).__name__}"
        )
    if calibration is not None and set(calibration.inputs) != {name for name, _, _ in found}:
        raise ValueError(
            "calibration holds the statistics of another model (its attention modules differ); "
            "calibrate this model: clover_core.calibrate(model, batches)"
        )
    stacks, where = _planned_stacks(found) if rank_major else ([], {})
    modules = {
        name: decompose_module(name, module, adapter, dtype=dtype, out=where.get(name), calibration=calibration)
        for name, module, adapter in with_progress(found, progress, "decomposing attention")
    }
    for stack in stacks:
        stack.s = torch.stack([modules[name].pairs[stack.pair].s for name in stack.names])
    log.info("decomposed %d attention modules", len(modules))
    return Decomposition(model, modules, _stacks=stacks if rank_major else None, calibration=calibration)


def _stack_groups(factors) -> dict[tuple, list[str]]:
    """The stacks :meth:`Decomposition.use_rank_major` makes: ``{(pair, a's shape, b's shape, dtype,
    device): module names}`` from ``(name, pair, a, b, device)`` in model order (pairs of one type
    whose factors agree in shape, dtype and device share a stack), in order of first appearance."""
    groups: dict[tuple, list[str]] = {}
    for name, pair, a, b, device in factors:
        groups.setdefault((pair, a.shape, b.shape, a.dtype, device), []).append(name)
    return groups


def _planned_stacks(found: list) -> tuple[list[FactorStack], dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Empty rank-major stacks for every module's factors, and each module's views of them, planned from
    copies of the modules on ``meta`` (shapes only: no weight is read or copied)."""
    entries = []
    for name, module, adapter in found:
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        shell = copy.deepcopy(module, {id(t): torch.empty_like(t, device="meta") for t in tensors})
        entries += [(name, pair, a, b, tensors[0].device) for pair, (a, b) in adapter.factors(shell).items()]
    stacks, where = [], {}
    for (pair, a_shape, b_shape, dtype, device), names in _stack_groups(entries).items():
        stack = FactorStack.empty(pair, names, a_shape, b_shape, dtype, device)
        for layer, name in enumerate(names):
            where.setdefault(name, {})[pair] = stack.views(layer)
        stacks.append(stack)
    return stacks, where


@torch.no_grad()
def decompose_module(
    name: str,
    module: nn.Module,
    adapter: Adapter,
    *,
    dtype: torch.dtype = torch.float32,
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibration: CalibrationStats | None = None,
) -> ModuleDecomposition:
    """Orthogonalize the pairs of ONE attention module (what :func:`decompose` does for each).

    Args:
        name: the module's dotted name in its model.
        module: the attention module; adapter: its adapter.
        dtype: precision of the decomposition.
        out: where to write each pair's rotated factors, ``{pair: (a_out, b_out)}`` (see
            :func:`orthogonalize`); new tensors where absent.
        calibration: statistics that weigh the pairs they cover (see :func:`decompose`).

    Returns:
        The module's :class:`ModuleDecomposition`.

    Raises:
        TypeError: non-floating weights or an unsupported ``dtype``.
        ValueError: weights on the ``meta`` device, or NaN / inf in a pair's weights.
    """
    _check_weights(name, module)
    md = ModuleDecomposition(name, adapter)
    for pair, (a, b) in adapter.factors(module).items():
        whitening = None if calibration is None else calibration.whitening(name, pair)
        try:
            if whitening is None:
                a_rot, b_rot, s, vanilla = orthogonalize_with_scores(a, b, dtype, (out or {}).get(pair))
            else:
                a_rot, b_rot, s, vanilla = orthogonalize_whitened(a, b, *whitening, (out or {}).get(pair))
        except NonFiniteFactors:
            label = {"qk": "Q-K", "vo": "V-O"}[pair]
            raise ValueError(
                f"{name}: its {label} weights hold NaN or inf values (or values too large to square "
                f"in {dtype}); CLOVER needs finite weights: check the checkpoint, or load it in a "
                "wider dtype"
            ) from None
        md.pairs[pair] = PairDecomposition(a_rot, b_rot, s.float(), vanilla)
    return md


def _check_weights(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if p.is_meta:
            raise ValueError(
                f"{name}.{pname} is on the meta device: the model has no weights loaded (load it "
                "with its weights, e.g. clover_core.load_model)"
            )
        if not p.is_floating_point():
            raise TypeError(
                f"{name}.{pname} has dtype {p.dtype}; CLOVER needs floating-point weights (dequantize the model first)"
            )


def spectra(model_or_dec: nn.Module | Decomposition) -> dict[str, dict[str, torch.Tensor]]:
    """Per-head singular values of every attention module.

    Args:
        model_or_dec: a model (decomposed on the fly) or a cached :class:`Decomposition` (no SVD).

    Returns:
        ``{module name: {"qk": (n_heads, head_dim), "vo": (n_groups, head_dim)}}``, each row
        descending. Rotary models have no ``"qk"`` entry.
    """
    dec = model_or_dec if isinstance(model_or_dec, Decomposition) else decompose(model_or_dec)
    return {name: {p: pd.s.clone() for p, pd in md.pairs.items()} for name, md in dec.modules.items()}


def with_progress(items: list, enabled: bool, desc: str, unit: str = "module") -> list:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)
