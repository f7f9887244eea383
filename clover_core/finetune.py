"""CLOVER fine-tuning (CLOVER-FT): train one small matrix per head between frozen orthonormal bases,
then multiply it back into the weights, so the fine-tuned model has zero added parameters.

Per head and pair, the product ``a @ b.T = U_a diag(S) U_b.T`` is orthogonalized exactly as for
pruning. The factors become ``a = U_a T`` and ``b = U_b`` with a trainable FULL ``k x k`` matrix ``T``
(``diag(S)`` at the start), so the prepared model computes what the original does. Rotary models
(Llama family) cannot orthogonalize Q-K; their Key projection is orthogonalized alone per KV head,
``W_k,h = Q R`` with ``R`` trainable (upper triangular at the start). Optionally every block of
``mlp_block`` consecutive output features of the MLP up-projection is treated the same way. With
grouped-query attention, V-O uses the adapter's grouped basis (one shared value head against the
stacked output blocks of its query heads), so a KV head has one trainable matrix.

The factors live in the module's own parameters through ``torch.nn.utils.parametrize``: the model
keeps its classes, forward pass, generation and KV cache; :meth:`CloverFT.merge` removes the
parametrizations and leaves plain weights of the original (or pruned) size.

    ft = cc.finetune.prepare(model, target="both")
    ft.print_trainable_parameters()
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-3, weight_decay=0.0)
    ...                                   # train ft.model as usual
    ft.save_adapter("adapter.safetensors")
    merged = ft.merge()                   # a plain model; same class and size as the input
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from . import architectures
from .architectures import Adapter, attention_modules
from .io.publish import umask_modes
from .io.weights import unreadable
from .trainable import (
    Core,
    FactorView,
    Fixed,
    Rewrite,
    Writes,
    add_writes,
    block_view,
    layout,
    qr_basis,
    svd_basis,
    write_once,
)

log = logging.getLogger(__name__)

Target = Literal["qk", "vo", "both"]
ADAPTER_FORMAT = "clover-studio-ft/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """Which matrices become trainable; validated on construction.

    ``target`` picks the attention pairs (``"qk"`` means the Key-side variant on rotary models);
    ``mlp`` adds the MLP up-projection, cut into heads of ``mlp_block`` output features.
    """

    target: Target = "both"
    mlp: bool = False
    mlp_block: int = 64

    def __post_init__(self) -> None:
        if self.target not in get_args(Target):
            raise ValueError(f"target={self.target!r} is not supported; choose one of {', '.join(get_args(Target))}")
        if not isinstance(self.mlp, bool):
            raise ValueError(f"mlp={self.mlp!r} must be True or False")
        if isinstance(self.mlp_block, bool) or not isinstance(self.mlp_block, int) or self.mlp_block < 1:
            raise ValueError(f"mlp_block={self.mlp_block!r} must be a positive integer, e.g. 64")

    @property
    def pairs(self) -> tuple[str, ...]:
        return ("qk", "vo") if self.target == "both" else (self.target,)


# --------------------------------------------------------------------------- preparing


def _live_from_ranks(module: nn.Module, pair: str, width: int, device: torch.device) -> torch.Tensor | None:
    """Per-head live directions of a pruned module (its kept ranks), None for an unpruned one."""
    ranks = getattr(module, "clover_ranks", {}).get(pair)
    if ranks is None:
        return None
    return torch.arange(width, device=device)[None] < torch.tensor(ranks, device=device)[:, None]  # (G, k)


def _attention_cores(
    module: nn.Module, adapter: Adapter, pairs: list[str], writes: Writes, fixed: Fixed
) -> dict[str, Core]:
    """Q-K / V-O of one attention module: ``a = U_a T`` (T trainable), ``b = U_b`` (frozen)."""
    places = layout(module, lambda m: tuple(f for p in pairs for f in adapter.factors(m)[p]))
    cores = {}
    with torch.no_grad():
        factors = adapter.factors(module)  # the pairs use disjoint entries: reading them all first is safe
        for i, pair in enumerate(pairs):
            a, b = factors[pair]
            u_a, u_b, s, live = svd_basis(a, b, _live_from_ranks(module, pair, a.shape[2], a.device))
            fixed.append((places[2 * i + 1], u_b * live[:, None, :].to(u_b.dtype)))
            cores[pair] = Core(u_a, torch.diag_embed(s), live)
            add_writes(writes, places[2 * i], cores[pair])
    return cores


def _block_core(layer: nn.Module, view: FactorView, writes: Writes) -> Core:
    """A projection cut into blocks of output features: ``W_block = Q R``, R trainable."""
    with torch.no_grad():
        q, r = qr_basis(view(layer))
    core = Core(q, r, torch.ones(r.shape[:2], dtype=torch.bool, device=r.device))
    add_writes(writes, layout(layer, lambda m: (view(m),))[0], core)
    return core


def _key_core(name: str, module: nn.Module, writes: Writes) -> Core:
    """The Key-side variant for rotary attention: one QR block per KV head of ``k_proj``."""
    proj, head_dim = getattr(module, "k_proj", None), getattr(module, "head_dim", None)
    if not isinstance(proj, nn.Linear) or not isinstance(head_dim, int):
        raise NotImplementedError(
            f"{name} ({type(module).__name__}) has no Q-K pair and no k_proj to train instead; use target='vo'"
        )
    return _block_core(proj, block_view(proj.out_features // head_dim), writes)


def up_projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MLP up-projection layers of ``model``, as ``(dotted name, layer)``.

    Raises:
        NotImplementedError: the model has none that CLOVER-FT knows.
    """
    blocks = architectures.up_projections()  # MLP block class -> its up-projection, over every family
    found = [
        (f"{name}.{attr}", getattr(m, attr))
        for name, m in model.named_modules()
        for cls, attr in blocks.items()
        if isinstance(m, cls)
    ]
    if not found:
        known = ", ".join(cls.__name__ for cls in blocks)
        raise NotImplementedError(f"mlp=True: {type(model).__name__} has no known MLP block ({known}); use mlp=False")
    return found


def _check_float(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if not p.is_floating_point():
            raise TypeError(
                f"{name}.{pname} has dtype {p.dtype}; CLOVER-FT needs floating-point weights "
                "(dequantize the model first)"
            )


def prepare(model: nn.Module, target: Target = "both", *, mlp: bool = False, mlp_block: int = 64) -> CloverFT:
    """Make ``model`` CLOVER-fine-tunable IN PLACE: everything frozen but one matrix per head and pair.

    Args:
        model: a transformers model with supported attention (GPT-2, Llama family, Whisper), pruned
            or not, on any device and in any floating dtype.
        target: ``"qk"``, ``"vo"`` or ``"both"``; on rotary models ``"qk"`` trains the Key projection
            (``W_k,h = Q R``, R trainable) since Q-K cannot be orthogonalized through the rotation.
        mlp: also train the MLP up-projection, as blocks of ``mlp_block`` output features.
        mlp_block: output features per MLP block (64 in the paper).

    Returns:
        A :class:`CloverFT` whose ``model`` computes what ``model`` did before (up to rounding).

    Raises:
        ValueError: a bad argument, or a model that is already prepared.
        TypeError: non-floating weights.
        NotImplementedError: no supported attention module (or MLP block, with ``mlp=True``).
    """
    config = FinetuneConfig(target, mlp, mlp_block)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(
            "this model already has parametrizations (is it prepared already?); merge() it first "
            "or pass the original model"
        )
    found = attention_modules(model)
    ups = up_projections(model) if config.mlp else []
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    cores: dict[str, Core] = {}
    writes, fixed = {}, []  # nothing in the model changes until every module has been checked
    for name, module, adapter in found:
        _check_float(name, module)
        available = adapter.factors(module)
        pairs = [p for p in config.pairs if p in available]
        cores.update({f"{name}.{p}": c for p, c in _attention_cores(module, adapter, pairs, writes, fixed).items()})
        if "qk" in config.pairs and "qk" not in available:  # rotary: the Key-side variant
            cores[f"{name}.k"] = _key_core(name, module, writes)
    for name, layer in ups:
        _check_float(name, layer)
        cores[f"{name}.up"] = _block_core(layer, block_view(_out_features(name, layer, config.mlp_block)), writes)
    for places, factor in fixed:
        write_once(places, factor)
    model.requires_grad_(False)
    for (owner, pname), entries in writes.items():
        parametrize.register_parametrization(owner, pname, Rewrite(entries))
    ft = CloverFT(model, cores, config, flags)
    log.info("CLOVER-FT: %d trainable matrices, %s", len(cores), ft.summary())
    return ft


def _out_features(name: str, layer: nn.Module, block: int) -> int:
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.nf if isinstance(layer, Conv1D) else None
    if out is None or out % block:
        raise ValueError(f"{name} has {out} output features, not a multiple of mlp_block={block}; pick a divisor")
    return out // block


# --------------------------------------------------------------------------- the prepared model


class CloverFT:
    """A model prepared for CLOVER fine-tuning (see :func:`prepare`); train ``ft.model`` as usual."""

    def __init__(self, model: nn.Module, cores: dict[str, Core], config: FinetuneConfig, flags: dict[str, bool]):
        self.model, self.cores, self.config = model, cores, config
        self._flags, self.merged = flags, False

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable matrices (hand these to the optimizer)."""
        self._check_open()
        return (core.weight for core in self.cores.values())

    def trainable_parameters(self) -> tuple[int, int, int]:
        """``(trainable, allocated, base)``: entries that can change the model, entries stored in the
        trainable matrices (more on pruned models, whose dead directions are masked), and the
        parameters of the model itself (its size after :meth:`merge`)."""
        self._check_open()
        allocated = sum(core.weight.numel() for core in self.cores.values())
        base = sum(p.numel() for p in self.model.parameters()) - allocated
        return sum(core.live_parameters for core in self.cores.values()), allocated, base

    def summary(self) -> str:
        trainable, allocated, base = self.trainable_parameters()
        masked = f" (allocated {allocated:,}; the rest are pruned directions)" if allocated != trainable else ""
        return f"trainable params: {trainable:,}{masked} || all params: {base:,} || trainable%: {100 * trainable / base:.4f}"

    def print_trainable_parameters(self, file=None) -> None:
        """Print :meth:`summary` (PEFT's method of the same name: printing is its purpose)."""
        print(self.summary(), file=file or sys.stdout)

    def merge(self) -> nn.Module:
        """Multiply the trained matrices into the weights, IN PLACE, and return the plain model.

        The result has the input model's classes, parameter names and sizes (a pruned model stays
        pruned) and the original ``requires_grad`` flags; this object cannot be used afterwards.
        """
        self._check_open()
        for module in list(self.model.modules()):
            if parametrize.is_parametrized(module):
                for pname in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(name, True))
        self.merged = True
        log.info("CLOVER-FT merged: %d matrices multiplied into the weights", len(self.cores))
        return self.model

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Write only the trainable matrices (safetensors), with a probe of each frozen basis.

        The file is written whole or not at all (safetensors writes a temporary file and renames it),
        with the permissions of the user's umask; missing parent folders are made.

        Raises:
            ValueError: ``path`` is a folder.
        """
        self._check_open()
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; pass the adapter's file name, e.g. {path / 'adapter.safetensors'}")
        tensors = {}
        for name, core in self.cores.items():
            tensors[f"{name}.weight"] = core.weight.detach().contiguous()
            tensors[f"{name}.probe"] = core.basis.sum(dim=1).float().contiguous()  # (G, k)
        meta = {"format": ADAPTER_FORMAT, "config": json.dumps(self.config.__dict__)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, os.fspath(path), metadata=meta)
        path.chmod(umask_modes(path.parent)[1])  # safetensors' temporary file was owner-only

    def load_adapter(self, path: str | os.PathLike) -> CloverFT:
        """Load matrices written by :meth:`save_adapter` into this prepared model; returns ``self``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a readable safetensors file, another format or configuration, missing or
                unexpected matrices, other shapes, or a probe that shows the adapter was trained on other
                base weights.
        """
        self._check_open()
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file; pass the file save_adapter() wrote")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise unreadable(path, e) from None
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not a CLOVER-FT adapter (format {meta.get('format')!r})")
        if json.loads(meta["config"]) != self.config.__dict__:
            raise ValueError(
                f"{path} was saved with {meta['config']}; prepare() this model with the same "
                f"settings (it has {json.dumps(self.config.__dict__)})"
            )
        device = next(iter(self.cores.values())).weight.device
        tensors = load_file(os.fspath(path), device=str(device))
        expected = {f"{n}.{kind}" for n in self.cores for kind in ("weight", "probe")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ValueError(f"{path} does not match this model: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, core in self.cores.items():
                _check_probe(name, core, tensors[f"{name}.probe"], tensors[f"{name}.weight"])
                core.weight.copy_(tensors[f"{name}.weight"].to(core.weight.dtype))
        return self

    def _check_open(self) -> None:
        if self.merged:
            raise RuntimeError(
                "this CloverFT was merged; use the model merge() returned (prepare() it again to fine-tune further)"
            )


def _check_probe(name: str, core: Core, probe: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != core.weight.shape:
        raise ValueError(
            f"adapter matrix {name} has shape {tuple(weight.shape)}, this model {tuple(core.weight.shape)}"
        )
    m = core.basis.shape[1]
    tol = m**0.5 * max(1e-4, 4 * torch.finfo(core.basis.dtype).eps)
    if not torch.allclose(probe, core.basis.sum(dim=1).float(), atol=tol, rtol=0):
        raise ValueError(
            f"adapter matrix {name} was trained on other base weights (its frozen basis differs); "
            "load it into a model prepared from the same base model"
        )
