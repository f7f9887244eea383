"""The math alone: one attention pair, rewritten exactly in its singular-vector basis.

A head's Q-K pair (or V-O pair) is a factorization ``A @ B.T`` of a large matrix with only
``head_dim`` inner directions. We rewrite it as ``A' @ B'.T`` with orthogonal columns ordered by
singular value, without ever forming the product: the Cholesky factor ``R_a`` of ``A``'s Gram
matrix, then the symmetric eigenproblem of the small ``head_dim x head_dim`` matrix
``R_a (B^T B) R_a^T``, batched over heads; Householder QR where the Gram route is not exact enough.
The cost is two GEMM passes over the attention weights; see ``benchmarks/decompose_speed.py``.
Nothing here knows a model: :mod:`clover_core.decompose` walks models and stores the results."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


# Orthogonality a Gram-route group may lose, at most: u * ||R^-1||_F^2 (R the Cholesky factor of a
# factor's column-scaled Gram matrix) bounds it; groups above this go through Householder QR instead.
GRAM_TOLERANCE = 2e-4


class NonFiniteFactors(ValueError):
    """A factor holds NaN or inf values (found on its Gram matrix's diagonal, at no extra pass)."""


def orthogonalize(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
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
    return orthogonalize_with_scores(a, b, dtype, out)[:3]


def orthogonalize_with_scores(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, ...]:
    """:func:`orthogonalize`, plus the :func:`vanilla_scores` of the un-rotated columns, read off the
    diagonals of the Gram matrices it computes anyway (no pass of their own over the factors)."""
    _check_factors(a, b, dtype)
    if out is not None:
        _check_out(a, b, out)
    with full_precision_matmuls():
        return _orthogonalize_checked(a, b, dtype, out)


def orthogonalize_whitened(
    a: torch.Tensor,
    b: torch.Tensor,
    whiten_a: torch.Tensor,
    whiten_b: torch.Tensor | None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`orthogonalize_with_scores` for the error measured on data: the product's directions are
    ordered by the singular values of ``L_a^T (a b^T) L_b`` (``L_b``: identity where None), and the
    rotated factors are mapped back to the model's own input spaces, so ``a_rot b_rot^T = a b^T`` still
    holds and keeping the first ``r`` columns is optimal for that error.

    Args:
        a, b: ``(G, m, k)`` and ``(G, n, k)`` factors.
        whiten_a: ``(m, m)`` lower-triangular ``L_a`` (the Cholesky factor of side a's input covariance);
            whiten_b: ``(n, n)`` ``L_b``, or None.
        out: as in :func:`orthogonalize`.

    Returns:
        ``(a_rot, b_rot, s, vanilla)``: ``s`` the whitened singular values, ``vanilla`` the calibrated
        baseline scores ``||L_a^T a_i|| * ||L_b^T b_i||`` (float32); the factors in ``a``'s dtype. The
        whitening and its inverse run in float64.
    """
    _check_factors(a, b, torch.float64)
    for name, t, w in (("a", a, whiten_a), ("b", b, whiten_b)):
        if w is not None and w.shape != (t.shape[1], t.shape[1]):
            raise ValueError(f"the whitening of factor {name} is {tuple(w.shape)}; its factor has {t.shape[1]} rows")
    if out is not None:
        _check_out(a, b, out)
    sides = [(a, whiten_a), (b, whiten_b)]
    with full_precision_matmuls():
        white = [x.double() if w is None else w.T.to(x.device, torch.float64) @ x.double() for x, w in sides]
        a_w, b_w, s, vanilla = _orthogonalize_checked(*white, torch.float64, None)
        rotated = [
            x if w is None else torch.linalg.solve_triangular(w.T.to(x.device, torch.float64), x, upper=True)
            for x, (_, w) in zip((a_w, b_w), sides)
        ]  # L^-T (L^T x T) = x T: back in the model's own input space
    a_rot, b_rot = rotated[0].to(a.dtype), rotated[1].to(b.dtype)
    if out is not None:
        a_rot, b_rot = out[0].copy_(a_rot), out[1].copy_(b_rot)
    return a_rot, b_rot, s, vanilla


def _orthogonalize_checked(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, ...]:
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
            raise NonFiniteFactors(
                f"factor {side} holds NaN or inf values (or values too large to square in "
                f"{a.dtype}); CLOVER needs finite weights"
            )
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
            raise TypeError(
                f"factor {name} has dtype {t.dtype}; CLOVER needs floating-point weights (dequantize the model first)"
            )
        if t.dim() != 3:
            raise ValueError(f"factor {name} must be (groups, rows, head_dim), got shape {tuple(t.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"factors do not pair up: a {tuple(a.shape)} vs b {tuple(b.shape)} "
            "(need the same number of groups and the same head_dim)"
        )


def _check_out(a: torch.Tensor, b: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError("out must be a pair of tensors (a_out, b_out), shaped like the factors a and b")
    for name, t, o in (("a", a, out[0]), ("b", b, out[1])):
        if (o.shape, o.dtype, o.device) != (t.shape, t.dtype, t.device):
            raise ValueError(
                f"out for factor {name} is {tuple(o.shape)} {o.dtype} on {o.device}; it must match "
                f"the factor: {tuple(t.shape)} {t.dtype} on {t.device}"
            )
        if any(o.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in (a, b)):
            raise ValueError(
                f"out for factor {name} shares memory with the factors; the rotation cannot be "
                "written over its own input: pass new tensors"
            )
