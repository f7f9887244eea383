"""The one extension point: how an attention module exposes its head pairs and is rebuilt smaller
(:class:`Adapter`), and everything else the engine knows of a model family (:class:`Family`).

Weights here use the ``x @ W`` convention (rows = inputs). A pair is two batched factors
``a: (G, m, head_dim)`` and ``b: (G, n, head_dim)`` whose per-group product ``a[g] @ b[g].T`` is what
the model computes: Q-K ``[W_q,h; b_q,h] @ [W_k,h; b_k,h].T`` and V-O ``[W_v,g; b_v,g] @ W_o,g`` with
biases folded in as a last input row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor]
Kind = Literal["lm", "speech", "diffusion"]  # what the app shows: text, transcripts or images
SHARED_CODE = "clover_attention.py"  # the attention every shipped modeling file imports


class Adapter(Protocol):
    """What the engine needs from one family of attention modules."""

    def factors(self, module: nn.Module) -> dict[str, Factors]:
        """The module's pairs, ``{"qk": (a, b), "vo": (a, b)}``; rotary models omit ``"qk"``."""
        ...

    def pruned(self, module: nn.Module, widths: dict[str, int], *, share: bool = False) -> nn.Module:
        """A new, uninitialized module like ``module`` whose pair ``p`` keeps ``widths[p]`` directions per head;
        the weights pruning leaves alone are copied from ``module``, or reused with ``share``."""
        ...

    def load_factors(self, module: nn.Module, factors: dict[str, Factors], *, share: bool = False) -> None:
        """Give a module made by :meth:`pruned` the padded factors ``(G, m, w)`` / ``(G, n, w)`` of every pair,
        as rank-major projections (and the widths ``w`` they imply, whatever the module had before).
        ``share`` makes the weights views of the factors where their memory allows; otherwise copies."""
        ...

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        """Parameters one kept direction of one head costs, per pair (biases included where they exist)."""
        ...

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int] | None:
        """K plus V features one generated token adds to this module's cache, ``(true, allocated)``,
        given per-head ranks; None for modules that cache nothing per generated token."""
        ...


@dataclass(frozen=True)
class RemoteCode:
    """The self-contained modeling code a pruned checkpoint of one model class carries (``remote/``).

    Attributes:
        module: the file's stem in ``remote/`` (``"modeling_clover_gpt2"``).
        cls: the class in it (``"CloverGPT2LMHeadModel"``), a subclass of the family's model class.
        autos: the auto classes ``config.json``'s ``auto_map`` points at it.
        extra: files it imports relatively, copied beside it.
    """

    module: str
    cls: str
    autos: tuple[str, ...]
    extra: tuple[str, ...] = (SHARED_CODE,)


@dataclass(frozen=True)
class Family:
    """Everything the engine knows of one model family; one instance per file of ``architectures/``.

    Attributes:
        name: a short name (``"gpt2"``).
        attention: the attention module class the adapter handles (looked up with ``isinstance``).
        adapter: how that module exposes its pairs and is rebuilt smaller.
        kind: ``"lm"``, ``"speech"`` or ``"diffusion"``: what the model's outputs are.
        model_class: the model class whose pruned checkpoints carry ``remote`` (None: none).
        remote: the modeling code shipped in its checkpoints (None: ``load_pruned`` only).
        model_types: the ``config.model_type`` values of the family (transformers models).
        auto_class: the transformers auto class that loads it (``"AutoModelForCausalLM"``).
        up_projections: MLP block class -> its up-projection's attribute, for CLOVER-FT's ``mlp=True``.
        kv_width: the unpruned model's K + V features one generated token adds to its cache, from its
            config (None: a model that keeps no KV cache).
        inputs: per pair, the attention module's projections whose inputs the pair's two sides see,
            ``{pair: (side a, side b)}`` (None for a side in the output space), for calibration: the
            statistics of those inputs weigh each direction by the activations that flow through it.
        norms: ``(model, attention module name) -> {projection: norm module or None}``, the LayerNorm /
            RMSNorm whose output each projection of ``inputs`` reads (None: an input no norm scales),
            for folding the norms' gains into the scores without data.
    """

    name: str
    attention: type[nn.Module]
    adapter: Adapter
    kind: Kind
    model_class: type[nn.Module] | None = None
    remote: RemoteCode | None = None
    model_types: tuple[str, ...] = ()
    auto_class: str | None = None
    up_projections: dict[type[nn.Module], str] = field(default_factory=dict)
    kv_width: Callable[[object], int] | None = None
    inputs: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    norms: Callable[[nn.Module, str], dict[str, nn.Module | None]] | None = None


def parent_of(model: nn.Module, name: str) -> nn.Module:
    """The module holding the submodule ``name`` (the model itself for a top-level name)."""
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def grouped_kv_width(config: object) -> int | None:
    """K + V features per token of a decoder with (grouped) KV heads, read off a transformers config
    (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``); None
    where the config lacks them."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if layers is None or heads is None:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim


def split_heads(
    weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int, *, rank_major: bool = False
) -> torch.Tensor:
    """``x @ W`` weight ``(d, n*k)`` and bias ``(n*k,)`` -> per-head factor ``(n, d + 1, k)``.

    Features are head-major (``h * k + j``, the original models) or, for pruned modules, rank-major
    (``j * n + h``). A missing bias becomes a zero row, so the folded form is exact for every module.
    The copy keeps ``weight``'s memory order (``nn.Linear`` stores ``W.T``): a straight copy, not a
    transposing one, and each head's columns stay contiguous for the decomposition's Gram GEMMs.
    """
    d, width = weight.shape
    transposed = weight.stride(0) == 1 and weight.stride(1) != 1  # W.T of an nn.Linear
    shape = (width, d + 1) if transposed else (d + 1, width)
    buffer = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    folded = buffer.T if transposed else buffer  # (d + 1, n * k)
    folded[:d].copy_(weight)
    if bias is None:
        folded[d].zero_()
    else:
        folded[d].copy_(bias)
    if rank_major:
        return folded.view(d + 1, width // n_heads, n_heads).permute(2, 0, 1)  # (n, d + 1, k)
    return folded.view(d + 1, n_heads, width // n_heads).permute(1, 0, 2)  # (n, d + 1, k)


def split_output(weight: torch.Tensor, n_heads: int, *, rank_major: bool = False) -> torch.Tensor:
    """Output projection ``(n*k, d_out)`` (``x @ W``) -> per-head right factor ``W_o,h.T``: ``(n, d_out, k)``."""
    width, d_out = weight.shape
    if rank_major:
        return weight.view(width // n_heads, n_heads, d_out).permute(1, 2, 0)  # (n, d_out, k)
    return weight.view(n_heads, width // n_heads, d_out).transpose(1, 2)  # (n, d_out, k)


def input_projection(
    factor: torch.Tensor, *, rank_major: bool, share: bool = False, x_at_w: bool = False, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A left factor ``(n, d + 1, w)`` -> the weight and bias of the projection that makes it.

    Args:
        factor: per-head columns with the bias as the last row, of any strides.
        rank_major: features ``j * n + h`` (a model re-pruned in place) instead of ``h * w + j``.
        share: return views of ``factor`` where its memory allows (a decomposition stores its factors
            rank-major, so their leading columns are a plain slice); otherwise fresh contiguous tensors.
        x_at_w: ``Conv1D`` layout ``(d, w*n)`` instead of ``nn.Linear``'s ``(w*n, d)``.
        bias: also make the bias (``False``: None, for a projection without one).

    Returns:
        ``(weight, bias)``, bias ``(w*n,)``.
    """
    n, _, w = factor.shape
    inputs, features = factor[:, :-1], ((2, 0) if rank_major else (0, 2))  # (n, d, w); feature order
    weight = inputs.permute(1, *features).flatten(1) if x_at_w else inputs.permute(*features, 1).flatten(0, 1)
    if not bias:
        return _owned(weight, factor, share), None
    row = factor[:, -1]  # (n, w)
    return _owned(weight, factor, share), _owned((row.T if rank_major else row).reshape(w * n), factor, share)


def output_projection(
    factor: torch.Tensor, *, rank_major: bool, share: bool = False, x_at_w: bool = False
) -> torch.Tensor:
    """A right factor ``(n, d_out, w)`` -> the output projection: ``nn.Linear``'s ``(d_out, w*n)`` or,
    with ``x_at_w``, ``Conv1D``'s ``(w*n, d_out)``; arguments as in :func:`input_projection`."""
    features = (2, 0) if rank_major else (0, 2)
    weight = factor.permute(*features, 1).flatten(0, 1) if x_at_w else factor.permute(1, *features).flatten(1)
    return _owned(weight, factor, share)


def load_input(proj: nn.Module, factor: torch.Tensor, *, rank_major: bool, share: bool, x_at_w: bool = False) -> None:
    """Give an input projection (``nn.Linear``, or GPT-2's ``Conv1D`` with ``x_at_w``) the weight and bias
    that make ``factor`` (see :func:`input_projection`), and the output width they imply. A projection
    without a bias (Whisper's ``k_proj``) keeps none: its factor's bias row is zero."""
    weight, bias = input_projection(
        factor, rank_major=rank_major, share=share, x_at_w=x_at_w, bias=proj.bias is not None
    )
    assign(proj, "weight", weight, share=share)
    if bias is not None:
        assign(proj, "bias", bias, share=share)
    set_attributes(proj, **{"nf" if x_at_w else "out_features": factor.shape[0] * factor.shape[2]})


def load_output(proj: nn.Module, factor: torch.Tensor, *, rank_major: bool, share: bool, x_at_w: bool = False) -> None:
    """Give an output projection the weight that makes ``factor`` (see :func:`output_projection`); its
    bias is not pruned."""
    weight = output_projection(factor, rank_major=rank_major, share=share, x_at_w=x_at_w)
    assign(proj, "weight", weight, share=share)
    if not x_at_w:
        set_attributes(proj, in_features=weight.shape[1])


def is_rank_major(module: nn.Module) -> bool:
    """Whether a pruned attention module uses the rank-major layout of a model re-pruned in place."""
    return bool(
        getattr(module, "rank_major", False) or getattr(getattr(module, "processor", None), "rank_major", False)
    )


def _owned(t: torch.Tensor, source: torch.Tensor, share: bool) -> torch.Tensor:
    if share:
        return t
    if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():  # a view: copy it
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


def assign(module: nn.Module, name: str, tensor: torch.Tensor, *, share: bool) -> None:
    """Set the existing parameter ``name`` of ``module`` to ``tensor`` (frozen when it is a shared view)."""
    module._parameters[name] = nn.Parameter(tensor, requires_grad=not share)  # registered already


def set_attributes(module: object, **values: object) -> None:
    """Set plain (non-parameter, non-module) attributes directly, without ``nn.Module.__setattr__``'s
    bookkeeping: a slider re-points every attention module on each move."""
    vars(module).update(values)
