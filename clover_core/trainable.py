"""CLOVER-FT's trainable parts: one small matrix per head between frozen orthonormal bases
(:class:`Core`), and the parametrization that writes the factors it makes into a module's own weights
(:class:`Rewrite`), found by tracing which weight entries a factor reads (:func:`layout`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .architectures.base import split_heads
from .orthogonalize import orthogonalize


class Core(nn.Module):
    """One trainable ``k x k`` matrix per head: the factor is ``basis @ (weight * mask)``.

    ``basis`` ``(G, m, k)`` has orthonormal columns (zero where a direction is dead: pruned away or
    non-existent); ``mask`` keeps the dead rows and columns of ``weight`` at zero.
    """

    def __init__(self, basis: torch.Tensor, init: torch.Tensor, live: torch.Tensor):
        super().__init__()
        mask = live[:, :, None] & live[:, None, :]  # (G, k, k)
        self.register_buffer("basis", basis * live[:, None, :].to(basis.dtype), persistent=False)
        self.register_buffer("mask", mask.to(basis.dtype), persistent=False)
        self.weight = nn.Parameter(init * self.mask)

    def forward(self) -> torch.Tensor:
        return self.basis @ (self.weight * self.mask)  # (G, m, k)

    @property
    def live_parameters(self) -> int:
        """Entries of ``weight`` that can change the model (the dead ones are masked)."""
        return int(self.mask.sum().item())


class Rewrite(nn.Module):
    """Parametrization of one tensor: the entries at ``pos`` come from trainable cores' factors."""

    def __init__(self, writes: list[tuple[Core, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.cores = nn.ModuleList(core for core, _, _ in writes)
        for i, (_, pos, src) in enumerate(writes):
            self.register_buffer(f"pos{i}", pos, persistent=False)  # flat indices into the tensor
            self.register_buffer(f"src{i}", src, persistent=False)  # flat indices into the core's factor

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        flat = original.flatten()
        for i, core in enumerate(self.cores):
            values = core().flatten().index_select(0, getattr(self, f"src{i}"))
            flat = flat.scatter(0, getattr(self, f"pos{i}"), values.to(flat.dtype))
        return flat.view_as(original)


FactorView = Callable[[nn.Module], tuple[torch.Tensor, ...]]  # module -> (G, m, k) factors, by re-indexing only
Place = list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]  # (owner, parameter name, pos, src)
Writes = dict[tuple[nn.Module, str], list[tuple[Core, torch.Tensor, torch.Tensor]]]
Fixed = list[tuple[Place, torch.Tensor]]  # frozen factors to store once, when every check has passed


class _View(nn.Module):  # lets functional_call substitute the parameters a view reads
    def __init__(self, module: nn.Module, view: FactorView):
        super().__init__()
        self.inner, self.view = module, view

    def forward(self) -> tuple[torch.Tensor, ...]:
        return self.view(self.inner)


def layout(module: nn.Module, view: FactorView) -> list[Place]:
    """Where each entry of each factor of ``view(module)`` is stored among ``module``'s parameters.

    The view runs once on parameters that hold their own unique ids (float64, exact), which traces any
    re-indexing an adapter does (splits, permutes, stacked groups) without knowing the architecture.

    Returns:
        Per factor, ``(owner, parameter name, pos, src)`` tuples: flattened factor entry ``src`` is
        flattened parameter entry ``pos``. Constant zeros (a missing bias row) belong to no parameter.

    Raises:
        ValueError: a parameter entry appears twice in a factor (the view is not a re-indexing).
    """
    named = list(module.named_parameters())
    ids, offset = {}, 1
    for name, p in named:
        ids[f"inner.{name}"] = torch.arange(offset, offset + p.numel(), dtype=torch.float64, device=p.device).view(
            p.shape
        )
        offset += p.numel()
    with torch.no_grad():
        factors = functional_call(_View(module, view), ids, ())
    return [_places(module, named, factor.flatten().long()) for factor in factors]


def _places(module: nn.Module, named: list[tuple[str, nn.Parameter]], traced: torch.Tensor) -> Place:
    found, offset = [], 1
    for name, p in named:
        src = ((traced >= offset) & (traced < offset + p.numel())).nonzero().squeeze(1)
        if src.numel():
            pos = traced[src] - offset
            seen = torch.zeros(p.numel(), dtype=torch.bool, device=pos.device)
            seen[pos] = True
            if int(seen.sum()) != pos.numel():
                raise ValueError(f"{type(module).__name__}.{name} appears twice in one factor; cannot write it back")
            owner, _, pname = f".{name}".rpartition(".")
            found.append((module.get_submodule(owner[1:]), pname, pos, src))
        offset += p.numel()
    return found


def write_once(places: Place, factor: torch.Tensor) -> None:
    """Store ``factor`` in the parameters at ``places`` (no gradient)."""
    flat = factor.flatten()
    with torch.no_grad():
        for owner, pname, pos, src in places:
            param = getattr(owner, pname)
            param.view(-1)[pos] = flat[src].to(param.dtype)


def add_writes(writes: Writes, places: Place, core: Core) -> None:
    for owner, pname, pos, src in places:
        writes.setdefault((owner, pname), []).append((core, pos, src))


# --------------------------------------------------------------------------- bases


def svd_basis(a: torch.Tensor, b: torch.Tensor, live: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Orthonormal singular bases of a pair with canonical signs (the largest entry of each ``U_a``
    column positive), so the same weights give the same basis on every device.

    Returns:
        ``(u_a (G, m, k), u_b (G, n, k), s (G, k), live (G, k) bool)``.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_rot, b_rot, s = orthogonalize(a.to(work), b.to(work), dtype=work)  # a_rot = U_a sqrt(S)
    root = s.sqrt()[:, None, :]
    alive = s > 0 if live is None else live & (s > 0)
    u_a = torch.where(root > 0, a_rot / root.clamp_min(torch.finfo(work).tiny), 0.0)
    u_b = torch.where(root > 0, b_rot / root.clamp_min(torch.finfo(work).tiny), 0.0)
    pivot = u_a.abs().argmax(dim=1, keepdim=True)  # (G, 1, k)
    sign = torch.where(u_a.gather(1, pivot) < 0, -1.0, 1.0).to(work)
    return (u_a * sign).to(a.dtype), (u_b * sign).to(b.dtype), s.to(a.dtype), alive


def qr_basis(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = Q R`` per group with ``diag(R) >= 0`` (the unique QR of a full-rank factor).

    Raises:
        ValueError: fewer rows than columns (the block is wider than its input).
    """
    g, m, k = a.shape
    if m < k:
        raise ValueError(f"a block of {k} features on {m} input rows has no square R; use a smaller mlp_block")
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    q, r = torch.linalg.qr(a.to(work))  # (G, m, k), (G, k, k)
    sign = torch.where(torch.diagonal(r, dim1=1, dim2=2) < 0, -1.0, 1.0).to(work)  # (G, k)
    return (q * sign[:, None, :]).to(a.dtype), (r * sign[:, :, None]).to(a.dtype)


def block_view(groups: int) -> FactorView:
    """A projection layer -> ``(groups, in + 1, out / groups)``: its output features cut into blocks,
    bias folded in as the last input row (``nn.Linear`` stores ``W.T``, GPT-2's ``Conv1D`` ``W``)."""

    def view(layer: nn.Module) -> torch.Tensor:
        weight = layer.weight.T if isinstance(layer, nn.Linear) else layer.weight  # (in, out)
        return split_heads(weight, layer.bias, groups)

    return view
