"""The one extension point: how an attention module exposes its head pairs and is rebuilt smaller.

Weights here use the ``x @ W`` convention (rows = inputs). A pair is two batched factors
``a: (G, m, head_dim)`` and ``b: (G, n, head_dim)`` whose per-group product ``a[g] @ b[g].T`` is what
the model computes: Q-K ``[W_q,h; b_q,h] @ [W_k,h; b_k,h].T`` and V-O ``[W_v,g; b_v,g] @ W_o,g`` with
biases folded in as a last input row.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor]


class Adapter(Protocol):
    """What the engine needs from one family of attention modules."""

    def factors(self, module: nn.Module) -> dict[str, Factors]:
        """The module's pairs, ``{"qk": (a, b), "vo": (a, b)}``; rotary models omit ``"qk"``."""
        ...

    def pruned(self, module: nn.Module, widths: dict[str, int]) -> nn.Module:
        """A new, uninitialized module like ``module`` whose pair ``p`` keeps ``widths[p]`` directions per head."""
        ...

    def load_factors(self, module: nn.Module, factors: dict[str, Factors]) -> None:
        """Write padded factors ``(G, m, width)`` / ``(G, n, width)`` into a module made by :meth:`pruned`."""
        ...

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        """Parameters one kept direction of one head costs, per pair (biases included where they exist)."""
        ...

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int] | None:
        """K plus V features one generated token adds to this module's cache, ``(true, allocated)``,
        given per-head ranks; None for modules that cache nothing per generated token."""
        ...


def split_heads(weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """``x @ W`` weight ``(d, n*k)`` and bias ``(n*k,)`` -> per-head factor ``(n, d + 1, k)``.

    A missing bias becomes a zero row, so the folded form is exact for every module.
    """
    d, width = weight.shape
    row = torch.zeros(1, width, dtype=weight.dtype, device=weight.device) if bias is None else bias[None]
    folded = torch.cat([weight, row], dim=0)  # (d + 1, n * k)
    return folded.view(d + 1, n_heads, width // n_heads).permute(1, 0, 2)  # (n, d + 1, k)


def merge_heads(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_heads`: ``(n, d + 1, k)`` -> weight ``(d, n*k)`` and bias ``(n*k,)``."""
    n, rows, k = factor.shape
    folded = factor.permute(1, 0, 2).reshape(rows, n * k)  # (d + 1, n * k)
    return folded[:-1].contiguous(), folded[-1].contiguous()


def split_output(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Output projection ``(n*k, d_out)`` (``x @ W``) -> per-head right factor ``W_o,h.T``: ``(n, d_out, k)``."""
    width, d_out = weight.shape
    return weight.view(n_heads, width // n_heads, d_out).transpose(1, 2)  # (n, d_out, k)


def merge_output(factor: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_output`: ``(n, d_out, k)`` -> ``(n*k, d_out)``."""
    n, d_out, k = factor.shape
    return factor.transpose(1, 2).reshape(n * k, d_out).contiguous()
