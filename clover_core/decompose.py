"""Per-head pair decomposition: the exact orthogonalization at the heart of CLOVER.

A head's Q-K pair (or V-O pair) is a factorization ``A @ B.T`` of a large matrix with only
``head_dim`` inner directions. We rewrite it as ``A' @ B'.T`` with orthogonal columns ordered by
singular value, without ever forming the product: the Cholesky factor ``R_a`` of ``A``'s Gram
matrix, then the symmetric eigenproblem of the small ``head_dim x head_dim`` matrix
``R_a (B^T B) R_a^T``, batched over heads. The cost is two GEMM passes over the attention weights;
see ``benchmarks/decompose_speed.py``."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, attention_modules

log = logging.getLogger(__name__)

PAIRS = ("qk", "vo")


# Orthogonality a Gram-route group may lose, at most: u * ||R^-1||_F^2 (R the Cholesky factor of a
# factor's column-scaled Gram matrix) bounds it; groups above this go through Householder QR instead.
GRAM_TOLERANCE = 2e-4


class NonFiniteFactors(ValueError):
    """A factor holds NaN or inf values (found on its Gram matrix's diagonal, at no extra pass)."""


def orthogonalize(
    a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float32,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite batched factor pairs in their singular-vector basis.

    Two GEMM passes over the factors: their ``k x k`` Gram matrices give the triangular factor
    ``R_a`` of ``A = Q_a R_a`` (Cholesky, float64) and, through the eigenproblem of
    ``R_a B^T B R_a^T``, the rotations; one multiplication per factor (``A' = A @ T_a``) applies them.
    ``Q_a`` is never formed, and all the small ``k x k`` algebra runs in float64 on the CPU (LAPACK),
    wherever the factors live. Groups whose factors are rank-deficient or too ill-conditioned for the
    Gram route (see ``GRAM_TOLERANCE``) fall back to Householder QR, so every input gets an exact
    answer.

    Args:
        a: ``(G, m, k)`` left factors (one per head or KV group).
        b: ``(G, n, k)`` right factors; ``a[g] @ b[g].T`` is head g's product.
        dtype: the precision of the big GEMMs / QR (float32 or float64).
        out: optional ``(a_out, b_out)``, shaped like ``a`` and ``b`` and of their dtypes and device,
            with any strides (views of :class:`FactorStack` storage, say): the rotated factors are
            written there, by the GEMMs themselves when ``dtype`` is the factors' own, and returned.

    Returns:
        ``(a_rot, b_rot, s)``: ``a_rot = U sqrt(S)`` and ``b_rot = V sqrt(S)``, both shaped like the
        inputs (columns past ``min(m, n, k)`` are zero), and ``s`` of shape ``(G, k)``, descending.
        ``a_rot @ b_rot.T == a @ b.T`` up to rounding; results are cast to ``a``'s dtype, ``s`` is
        returned in ``dtype``.

    Raises:
        TypeError: non-floating factors or an unsupported compute dtype.
        ValueError: mismatched batch or inner dimensions, an ``out`` unlike the factors, or factors holding
            NaN or inf values.
    """
    return _orthogonalize(a, b, dtype, out)[:3]


def _orthogonalize(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                   out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """:func:`orthogonalize`, plus the :func:`vanilla_scores` of the un-rotated columns, read off the
    diagonals of the Gram matrices it computes anyway (no pass of their own over the factors)."""
    _check_factors(a, b, dtype)
    if out is not None:
        _check_out(a, b, out)
    with full_precision_matmuls():
        return _orthogonalize_checked(a, b, dtype, out)


def _orthogonalize_checked(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                           out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    ac, bc = a.to(dtype), b.to(dtype)
    ta, tb, s, ok, vanilla = _gram_rotation(ac, bc)
    direct = out is not None and a.dtype == b.dtype == dtype  # the GEMMs write straight into ``out``
    a_out, b_out = out if direct else (None, None)
    a_rot, b_rot = torch.bmm(ac, ta.to(ac), out=a_out), torch.bmm(bc, tb.to(bc), out=b_out)  # (G, m, k), (G, n, k)
    s = s.to(device=a.device, dtype=dtype)
    if not ok.all():
        bad = (~ok).nonzero().squeeze(1).to(a.device)
        a_rot[bad], b_rot[bad], s[bad] = _householder(ac[bad], bc[bad])
        log.debug("%d of %d groups took the Householder QR route", len(bad), len(ok))
    if out is not None and not direct:
        a_rot, b_rot = out[0].copy_(a_rot), out[1].copy_(b_rot)
    return a_rot.to(a.dtype), b_rot.to(b.dtype), s, vanilla.to(device=a.device, dtype=torch.float32)


_PRECISION_LOCK = threading.Lock()
_precision_users = 0
_restore_precision: Callable[[], None] | None = None


@contextlib.contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """float32 matrix products computed in float32 inside the block, whatever the process asked for.

    ``torch.set_float32_matmul_precision("high"/"medium")``, ``torch.backends.cuda.matmul.allow_tf32``
    or the ``fp32_precision`` switches let float32 GEMMs run in TF32 (cuBLAS) or bfloat16 (oneDNN, on
    CPUs that have it): about 1e-3 relative error on a GPU, where the decomposition promises float32
    rounding. Where such a setting is on, it is switched to full float32 when the first caller enters
    and restored, as it was, when the last one leaves (concurrent decompositions share the switch);
    other threads' float32 GEMMs meanwhile run in full precision too: slower, never less exact. Where
    none is on (the default), nothing is touched.
    """
    global _precision_users, _restore_precision
    with _PRECISION_LOCK:
        if _precision_users == 0:
            _restore_precision = _set_full_precision()
        _precision_users += 1
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            _precision_users -= 1
            if _precision_users == 0:
                restore, _restore_precision = _restore_precision, None
                restore()


_MATMUL_SWITCHES = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)  # what the GEMM kernels read


def _set_full_precision() -> Callable[[], None]:
    """Switch float32 GEMMs to full precision if they are not; returns what restores the setting.

    The kernels read the per-backend switches. PyTorch also keeps the legacy process-wide precision,
    and its legacy getters raise when the two disagree, so both are changed together: through
    ``torch.set_float32_matmul_precision`` when the legacy value is readable, then the per-backend
    values are put back exactly as they read before."""
    saved = [s.fp32_precision for s in _MATMUL_SWITCHES]
    if saved[0] != "tf32" and saved[1] not in ("bf16", "tf32"):
        return lambda: None
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the legacy and per-backend switches already disagree: leave the legacy one be
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    for s in _MATMUL_SWITCHES:
        s.fp32_precision = "ieee"

    def restore() -> None:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for s, value in zip(_MATMUL_SWITCHES, saved):
            if s.fp32_precision != value:
                s.fp32_precision = value

    return restore


def _rank_major_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a ``(G, rows, k)`` tensor stored rank-major (``.permute(2, 0, 1)`` is contiguous)."""
    g, rows, k = t.shape
    return torch.empty(k, g, rows, dtype=t.dtype, device=t.device).permute(1, 2, 0).copy_(t)


def _gram_rotation(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ``k x k`` transforms ``T_a, T_b`` with ``A T_a = U sqrt(S)``, ``B T_b = V sqrt(S)``.

    With ``A = Q_a R_a`` (``R_a`` from the Cholesky factor of ``A^T A``), the product is
    ``Q_a (R_a B^T)``, and ``M = R_a (B^T B) R_a^T = U S^2 U^T`` gives both sides:
    ``T_a = R_a^-1 U S^1/2`` and ``T_b = R_a^T U S^-1/2`` (then ``T_a T_b^T = I``, so the product is
    kept exactly whatever the rounding in ``U``). ``B`` needs no factorization of its own.

    Returns ``(T_a, T_b, s, ok, vanilla)`` in float64 on the CPU; ``ok[g]`` is False where group g
    needs QR; ``vanilla`` holds the products of the factors' column norms (the Gram diagonals).
    """
    gram_a, gram_b = _gram(a), _gram(b)  # (G, k, k) float64 on the CPU
    for side, gram in (("a", gram_a), ("b", gram_b)):  # a NaN or inf anywhere reaches a column's norm
        if not torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all():
            raise NonFiniteFactors(f"factor {side} holds NaN or inf values (or values too large to square in "
                                   f"{a.dtype}); CLOVER needs finite weights")
    ra, info = torch.linalg.cholesky_ex(gram_a, upper=True)
    ok = info == 0
    if not ok.all():  # failed groups: any finite stand-in, QR redoes them
        ra = torch.where(ok[:, None, None], ra, torch.eye(ra.shape[-1], dtype=ra.dtype))
    lam, u = torch.linalg.eigh(ra @ gram_b @ ra.mT)  # ascending
    lam, u = lam.flip(-1).clamp_min(0), u.flip(-1)
    ok &= lam[:, -1] > 1e-10 * lam[:, 0]  # a (nearly) rank-deficient product: QR
    lam = torch.where(ok[:, None], lam, 1.0)
    s = lam.sqrt()
    ra_inv_u = torch.linalg.solve_triangular(ra, u, upper=True)  # R_a^-1 U: A's orthonormal columns
    ra_t_u = ra.mT @ u  # R_a^T U = B's orthonormal columns * S
    ok &= _gram_route_accurate(ra_inv_u.square().sum(-1), gram_a, a.dtype)
    ok &= _gram_route_accurate((ra_t_u.square() @ lam.reciprocal().unsqueeze(-1)).squeeze(-1), gram_b, b.dtype)
    root = s.sqrt().unsqueeze(1)  # (G, 1, k)
    vanilla = (gram_a.diagonal(dim1=-2, dim2=-1) * gram_b.diagonal(dim1=-2, dim2=-1)).sqrt()
    return ra_inv_u * root, ra_t_u / root, s, ok, vanilla


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` in float64 on the CPU for ``(G, m, k)`` factors: the right half of the columns in one
    GEMM, the leading block in another (3/4 of a full product's work), mirrored."""
    g, _, k = x.shape
    h = k // 2
    right = x.mT @ x[..., h:]  # (G, k, k - h): every column against the right half
    gram = torch.empty(g, k, k, dtype=torch.float64)
    gram[..., h:] = right
    gram[..., h:, :h] = right[..., :h, :].mT
    gram[..., :h, :h] = x[..., :h].mT @ x[..., :h]
    return gram


def _gram_route_accurate(row_norms2: torch.Tensor, gram: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether the columns ``X T`` stay orthogonal through the rounding of ``gram = X^T X``.

    ``row_norms2`` holds the squared row norms of the ``T`` that makes ``X``'s columns orthonormal
    (``R^-1 U``, with ``R^T R = gram``). With ``D`` the column norms of ``X``, the loss is at most
    ``u * ||D R^-1||_F^2 = u * sum_i D_i^2 row_norms2_i``: ``||R^-1||_F^2`` of the column-scaled Gram's
    Cholesky factor, which depends on how independent the columns' directions are, not on their
    norms (``u``: the unit roundoff of the Gram GEMM). Groups above ``GRAM_TOLERANCE`` (or with a zero
    column) need QR.
    """
    norms2 = gram.diagonal(dim1=-2, dim2=-1)  # (G, k)
    loss = torch.finfo(dtype).eps / 2 * (norms2 * row_norms2).sum(-1)
    return (norms2 > 0).all(dim=-1) & (loss <= GRAM_TOLERANCE)  # NaN loss compares False


def _householder(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact fallback: thin QR of each factor, SVD of the ``k x k`` core, zero-padded to ``k``."""
    k = a.shape[-1]
    qa, ra = torch.linalg.qr(a)  # (G, m, ka), (G, ka, k)
    qb, rb = torch.linalg.qr(b)  # (G, n, kb), (G, kb, k)
    uc, s, vch = torch.linalg.svd(ra @ rb.transpose(1, 2), full_matrices=False)  # core (G, ka, kb)
    root = s.sqrt().unsqueeze(1)  # (G, 1, r)
    a_rot = (qa @ uc) * root  # (G, m, r)
    b_rot = (qb @ vch.transpose(1, 2)) * root  # (G, n, r)
    r = s.shape[-1]
    if r < k:  # fewer than k directions exist: pad with zero columns
        a_rot, b_rot, s = (nn.functional.pad(t, (0, k - r)) for t in (a_rot, b_rot, s))
    return a_rot, b_rot, s


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


def _check_out(a: torch.Tensor, b: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError("out must be a pair of tensors (a_out, b_out), shaped like the factors a and b")
    for name, t, o in (("a", a, out[0]), ("b", b, out[1])):
        if (o.shape, o.dtype, o.device) != (t.shape, t.dtype, t.device):
            raise ValueError(f"out for factor {name} is {tuple(o.shape)} {o.dtype} on {o.device}; it must match "
                             f"the factor: {tuple(t.shape)} {t.dtype} on {t.device}")
        if any(o.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in (a, b)):
            raise ValueError(f"out for factor {name} shares memory with the factors; the rotation cannot be "
                             "written over its own input: pass new tensors")


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

    Holds a reference to the (unchanged) model: vanilla pruning reads the original columns from it.
    """

    model: nn.Module
    modules: dict[str, ModuleDecomposition]
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
        groups = _stack_groups((name, pair, pd.a, pd.b, pd.a.device) for name, md in self.modules.items()
                               for pair, pd in md.pairs.items())
        self._stacks = [FactorStack.of(key[0], [(name, self.modules[name].pairs[key[0]]) for name in names])
                        for key, names in groups.items()]

    @property
    def stacks(self) -> list[FactorStack]:
        """The rank-major factors, one :class:`FactorStack` per pair type and shape (after
        :meth:`use_rank_major`; empty before)."""
        return self._stacks or []

    def ranking(self, pair: str, score: str) -> torch.Tensor:
        """Every head's directions of ``pair`` in every module, weakest ``score`` first (``"s"`` or
        ``"vanilla"``; a stable sort of the scores flattened in module order), computed once: the
        ``global`` mode's order, which no ratio changes."""
        key = (pair, score)
        if key not in self._rankings:
            flat = torch.cat([getattr(md.pairs[pair], score).flatten() for md in self.modules.values()])
            self._rankings[key] = torch.argsort(flat, stable=True)
        return self._rankings[key]

    def original(self, name: str, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-rotated factors of one pair of module ``name``, copied once into rank-major storage
        (like the rotated ones) and cached: vanilla pruning and pairs left whole read them."""
        key = (name, pair)
        if key not in self._originals:
            md = self.modules[name]
            a, b = md.adapter.factors(self.model.get_submodule(name))[pair]
            self._originals[key] = _rank_major_copy(a), _rank_major_copy(b)
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
    def empty(cls, pair: str, names: list[str], a_shape: torch.Size, b_shape: torch.Size, dtype: torch.dtype,
              device: torch.device) -> FactorStack:
        """Uninitialized storage for modules ``names`` whose factors are ``(G, m, k)`` and ``(G, n, k)``;
        ``s`` is filled in by :meth:`of` or :func:`decompose`."""
        a_stack, b_stack = (torch.empty(len(names), k, g, rows, dtype=dtype, device=device)
                            for g, rows, k in (a_shape, b_shape))
        return cls(pair, list(names), a_stack, b_stack, torch.empty(0))

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``names[layer]``'s ``(G, m, k)`` and ``(G, n, k)`` factors: views of the stacks."""
        return self.a[layer].permute(1, 2, 0), self.b[layer].permute(1, 2, 0)

    @classmethod
    def of(cls, pair: str, members: list[tuple[str, PairDecomposition]]) -> FactorStack:
        """Copy the members' factors into the stack and point their ``PairDecomposition`` at it."""
        first = members[0][1]
        stack = cls.empty(pair, [name for name, _ in members], first.a.shape, first.b.shape, first.a.dtype,
                          first.a.device)
        for layer, (_, pd) in enumerate(members):
            views = stack.views(layer)
            for view, t in zip(views, (pd.a, pd.b)):
                view.copy_(t)
            pd.a, pd.b = views
        stack.s = torch.stack([pd.s for _, pd in members])
        return stack


def decompose(model: nn.Module, *, dtype: torch.dtype = torch.float32, progress: bool = False,
              rank_major: bool = False) -> Decomposition:
    """Orthogonalize every supported attention module of ``model`` (the model is not modified).

    Args:
        model: a transformers / diffusers model with supported attention modules.
        dtype: precision of the QR/SVD, ``torch.float32`` (default) or ``torch.float64``.
        progress: show a progress bar over attention modules.
        rank_major: write the rotated factors straight into the rank-major stacks that
            :class:`~clover_core.Slider` and ``prune(..., share_weights=True)`` read (what
            :meth:`Decomposition.use_rank_major` makes afterwards by copying every factor): the same
            decomposition without that copy, or its second set of factors in memory while it runs.

    Returns:
        A reusable :class:`Decomposition`.

    Raises:
        NotImplementedError: the model has no supported attention module.
        TypeError: not a torch module, non-floating weights or an unsupported ``dtype``.
        ValueError: weights on the ``meta`` device (not loaded), or NaN / inf in an attention module's
            weights (the message names the module and pair).
    """
    found = attention_modules(model)
    stacks, where = _planned_stacks(found) if rank_major else ([], {})
    modules = {name: decompose_module(name, module, adapter, dtype=dtype, out=where.get(name))
               for name, module, adapter in with_progress(found, progress, "decomposing attention")}
    for stack in stacks:
        stack.s = torch.stack([modules[name].pairs[stack.pair].s for name in stack.names])
    log.info("decomposed %d attention modules", len(modules))
    return Decomposition(model, modules, _stacks=stacks if rank_major else None)


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
def decompose_module(name: str, module: nn.Module, adapter: Adapter, *, dtype: torch.dtype = torch.float32,
                     out: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ModuleDecomposition:
    """Orthogonalize the pairs of ONE attention module (what :func:`decompose` does for each).

    Args:
        name: the module's dotted name in its model.
        module: the attention module; adapter: its adapter.
        dtype: precision of the decomposition.
        out: where to write each pair's rotated factors, ``{pair: (a_out, b_out)}`` (see
            :func:`orthogonalize`); new tensors where absent.

    Returns:
        The module's :class:`ModuleDecomposition`.

    Raises:
        TypeError: non-floating weights or an unsupported ``dtype``.
        ValueError: weights on the ``meta`` device, or NaN / inf in a pair's weights.
    """
    _check_weights(name, module)
    md = ModuleDecomposition(name, adapter)
    for pair, (a, b) in adapter.factors(module).items():
        try:
            a_rot, b_rot, s, vanilla = _orthogonalize(a, b, dtype, (out or {}).get(pair))
        except NonFiniteFactors:
            label = {"qk": "Q-K", "vo": "V-O"}[pair]
            raise ValueError(f"{name}: its {label} weights hold NaN or inf values (or values too large to square "
                             f"in {dtype}); CLOVER needs finite weights: check the checkpoint, or load it in a "
                             "wider dtype") from None
        md.pairs[pair] = PairDecomposition(a_rot, b_rot, s.float(), vanilla)
    return md


def _check_weights(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if p.is_meta:
            raise ValueError(f"{name}.{pname} is on the meta device: the model has no weights loaded (load it "
                             "with its weights, e.g. clover_core.load_model)")
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


def with_progress(items: list, enabled: bool, desc: str, unit: str = "module") -> list:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)
