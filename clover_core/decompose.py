"""Per-head pair decomposition: the exact orthogonalization at the heart of CLOVER.

A head's Q-K pair (or V-O pair) is a factorization ``A @ B.T`` of a large matrix with only
``head_dim`` inner directions. We rewrite it as ``A' @ B'.T`` with orthogonal columns ordered by
singular value, without ever forming the product: thin QR of each factor, then an SVD of the small
``head_dim x head_dim`` core, batched over heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, attention_modules

log = logging.getLogger(__name__)

PAIRS = ("qk", "vo")


def orthogonalize(
    a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite batched factor pairs in their singular-vector basis.

    Args:
        a: ``(G, m, k)`` left factors (one per head or KV group).
        b: ``(G, n, k)`` right factors; ``a[g] @ b[g].T`` is head g's product.
        dtype: the precision of the QR/SVD (float32 or float64).

    Returns:
        ``(a_rot, b_rot, s)``: ``a_rot = U sqrt(S)`` and ``b_rot = V sqrt(S)``, both shaped like the
        inputs (columns past ``min(m, n, k)`` are zero), and ``s`` of shape ``(G, k)``, descending.
        ``a_rot @ b_rot.T == a @ b.T`` up to rounding; results are cast to ``a``'s dtype, ``s`` is
        returned in ``dtype``.

    Raises:
        TypeError: non-floating factors or an unsupported compute dtype.
        ValueError: mismatched batch or inner dimensions.
    """
    _check_factors(a, b, dtype)
    g, m, k = a.shape
    qa, ra = torch.linalg.qr(a.to(dtype))  # (G, m, ka), (G, ka, k)
    qb, rb = torch.linalg.qr(b.to(dtype))  # (G, n, kb), (G, kb, k)
    uc, s, vch = torch.linalg.svd(ra @ rb.transpose(1, 2), full_matrices=False)  # core (G, ka, kb)
    root = s.sqrt().unsqueeze(1)  # (G, 1, r)
    a_rot = (qa @ uc) * root  # (G, m, r)
    b_rot = (qb @ vch.transpose(1, 2)) * root  # (G, n, r)
    r = s.shape[-1]
    if r < k:  # fewer than k directions exist: pad with zero columns
        a_rot = nn.functional.pad(a_rot, (0, k - r))
        b_rot = nn.functional.pad(b_rot, (0, k - r))
        s = nn.functional.pad(s, (0, k - r))
    return a_rot.to(a.dtype), b_rot.to(b.dtype), s


def vanilla_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's baseline score of each original direction: ``||a_i|| * ||b_i||``.

    Args:
        a: ``(G, m, k)`` left factors; b: ``(G, n, k)`` right factors.

    Returns:
        ``(G, k)`` float32 scores of the un-rotated columns.
    """
    return a.float().norm(dim=1) * b.float().norm(dim=1)


def _check_factors(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype={dtype} is not supported for the decomposition; use torch.float32 or torch.float64")
    for name, t in (("a", a), ("b", b)):
        if not t.is_floating_point():
            raise TypeError(f"factor {name} has dtype {t.dtype}; CLOVER needs floating-point weights "
                            "(dequantize the model first)")
        if t.dim() != 3:
            raise ValueError(f"factor {name} must be (groups, rows, head_dim), got shape {tuple(t.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"factors do not pair up: a {tuple(a.shape)} vs b {tuple(b.shape)} "
                         "(need the same number of groups and the same head_dim)")


@dataclass
class PairDecomposition:
    """One pair type (Q-K or V-O) of one attention module, orthogonalized.

    ``a``/``b`` are the rotated factors in the model's dtype, ``s`` the singular values (descending)
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

    Holds a reference to the (unchanged) model: vanilla pruning reads the original columns from it.
    """

    model: nn.Module
    modules: dict[str, ModuleDecomposition]

    @property
    def pair_types(self) -> tuple[str, ...]:
        """The pair types present in every module (``qk`` is absent for rotary models)."""
        present = [set(m.pairs) for m in self.modules.values()]
        return tuple(p for p in PAIRS if all(p in s for s in present))


def decompose(model: nn.Module, *, dtype: torch.dtype = torch.float32, progress: bool = False) -> Decomposition:
    """Orthogonalize every supported attention module of ``model`` (the model is not modified).

    Args:
        model: a transformers / diffusers model with supported attention modules.
        dtype: precision of the QR/SVD, ``torch.float32`` (default) or ``torch.float64``.
        progress: show a progress bar over attention modules.

    Returns:
        A reusable :class:`Decomposition`.

    Raises:
        NotImplementedError: the model has no supported attention module.
        TypeError: non-floating weights or an unsupported ``dtype``.
    """
    found = attention_modules(model)
    modules: dict[str, ModuleDecomposition] = {}
    with torch.no_grad():
        for name, module, adapter in _maybe_tqdm(found, progress, "decomposing attention"):
            _check_weights(name, module)
            md = ModuleDecomposition(name, adapter)
            for pair, (a, b) in adapter.factors(module).items():
                a_rot, b_rot, s = orthogonalize(a, b, dtype=dtype)
                md.pairs[pair] = PairDecomposition(a_rot, b_rot, s.float(), vanilla_scores(a, b))
            modules[name] = md
    log.info("decomposed %d attention modules", len(modules))
    return Decomposition(model, modules)


def _check_weights(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"{name}.{pname} has dtype {p.dtype}; CLOVER needs floating-point weights "
                            "(dequantize the model first)")


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


def _maybe_tqdm(items: list, enabled: bool, desc: str) -> list:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="module")
