"""Activation statistics for data-aware (calibrated) scores, gathered by forward hooks in one pass.

The paper ranks a head's directions by the weights alone; what a direction costs depends on the
activations that flow through it. For each side of each pair, with ``X`` the inputs that side sees
(rows = tokens, a column of ones for the bias) and ``C = X^T X / n`` their second moment, the error a
pruned pair makes on that data is ``||L_a^T (A B^T - A_r B_r^T) L_b||`` (``C = L L^T``, damped; ``L_b``
only where side b reads inputs too: the keys of Q-K, not the outputs of V-O). The decomposition
whitens the factors with ``L^T`` before it orthogonalizes them and maps the rotated factors back, so
the kept directions are optimal for that error while the model keeps its shapes and is exact at full
rank; vanilla's score of dimension ``i`` becomes ``||L_a^T a_i|| * ||L_b^T b_i||``.

    stats = cc.calibrate(model, cc.text_batches(tokenizer, text))  # one forward pass
    dec = cc.decompose(model, calibration=stats)
    pruned = cc.prune(dec, ratio=0.25, target="vo")

Statistics are gathered on the original model, once (not layer by layer on the pruned one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import attention_modules, family_for
from .metrics import position_limit

log = logging.getLogger(__name__)

DAMP = 1e-2  # added to every covariance's diagonal, as a share of its mean diagonal
MIN_TOKENS = 16  # fewer calibration tokens than this cannot describe a projection's inputs


@dataclass
class CalibrationStats:
    """The second moments of the inputs of every attention projection a pair reads, in float64.

    Attributes:
        covariances: ``"module.projection"`` -> ``(d + 1, d + 1)`` ``X^T X / n`` of its inputs with a
            column of ones appended (the bias row of the factors).
        tokens: ``"module.projection"`` -> rows ``n`` it saw.
        inputs: attention module -> ``{pair: (side a, side b)}``, the keys above each side reads (None:
            a side in the output space, not whitened).
        source: what data calibrated (for the record and the reports).
        damp: the share of the mean diagonal added to each covariance before it is factored.
        statistic: what the covariances are (``"input covariance"``; ``"norm gains"`` for
            :func:`norm_statistics`).
    """

    covariances: dict[str, torch.Tensor]
    tokens: dict[str, int]
    inputs: dict[str, dict[str, tuple[str, str | None]]]
    source: str = "unnamed data"
    damp: float = DAMP
    statistic: str = "input covariance"
    _factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def whitening(self, module: str, pair: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The lower-triangular ``(L_a, L_b)`` (``L_b`` None: that side is not whitened) of one pair of
        one attention module, or None where these statistics do not cover it.

        Raises:
            ValueError: a covariance that is not positive definite even after damping, or not finite.
        """
        sides = self.inputs.get(module, {}).get(pair)
        if sides is None:
            return None
        a, b = sides
        return self._cholesky(a), (None if b is None else self._cholesky(b))

    def _cholesky(self, key: str) -> torch.Tensor:
        if key not in self._factors:
            c = self.covariances[key]
            if not torch.isfinite(c).all():
                raise ValueError(
                    f"the calibration statistics of {key} hold NaN or inf (the model produced them on "
                    "the calibration data): check the data and the model's dtype"
                )
            damped = c + self.damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            factor, info = torch.linalg.cholesky_ex(damped)
            if info != 0:
                raise ValueError(
                    f"the calibration covariance of {key} is not positive definite even with damp="
                    f"{self.damp:g}; pass a larger damp or more calibration tokens"
                )
            self._factors[key] = factor
        return self._factors[key]

    def describe(self) -> dict:
        """What the pruning record keeps of these statistics."""
        return {
            "statistic": self.statistic,
            "data": self.source,
            "tokens": min(self.tokens.values()),
            "damp": self.damp,
        }


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    source: str = "unnamed data",
    damp: float = DAMP,
    progress: bool = False,
) -> CalibrationStats:
    """Run ``model`` on ``batches`` once and record the second moments of every input a pair reads.

    Args:
        model: a model with supported attention modules (left unchanged; hooks are removed after).
        batches: the model's own keyword inputs, one dict per forward pass (``input_ids`` for a language
            model; ``input_features`` and ``decoder_input_ids`` for Whisper; the UNet's inputs), without
            padding: every row of every input counts.
        source: what the data is, recorded with the statistics (e.g. ``"paradise_lost.txt, 4096 tokens"``).
        damp: the share of each covariance's mean diagonal added to its diagonal before it is factored.
        progress: show a progress bar over the batches.

    Returns:
        The :class:`CalibrationStats` for :func:`clover_core.decompose` and :func:`clover_core.prune`.

    Raises:
        ValueError: no batches, fewer than ``MIN_TOKENS`` rows reached a projection, NaN or inf
            activations, a batch that is not a dict, or a bad ``damp``.
        NotImplementedError: the model has no supported attention module, or a family without the
            ``inputs`` calibration needs.
    """

    def run() -> int:
        count = 0
        for batch in _with_progress(batches, progress):
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"a calibration batch must be a dict of the model's keyword inputs, got "
                    f"{type(batch).__name__}; e.g. {{'input_ids': ids}}"
                )
            _check_length(model, batch)
            device = next(model.parameters()).device
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            count += 1
        if count == 0:
            raise ValueError("batches is empty; pass at least one batch of calibration inputs")
        return count

    return calibrate_while(model, run, source=source, damp=damp)


@torch.no_grad()
def calibrate_while(
    model: nn.Module, run: Callable[[], object], *, source: str = "unnamed data", damp: float = DAMP
) -> CalibrationStats:
    """:func:`calibrate` for inputs that only a caller can produce: the statistics of every call of
    ``model`` that ``run()`` makes (a diffusion pipeline generating images, say, calls its UNet).

    Raises:
        ValueError: as :func:`calibrate`: too few rows, NaN or inf activations, a bad ``damp``.
    """
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp={damp!r} must be a positive number, e.g. {DAMP}")
    inputs, projections = _projections(model)
    covariances: dict[str, torch.Tensor] = {}
    tokens = dict.fromkeys(projections, 0)
    hooks = [proj.register_forward_pre_hook(_accumulate(key, covariances, tokens)) for key, proj in projections.items()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    short = sorted(k for k, n in tokens.items() if n < MIN_TOKENS)
    if short:
        raise ValueError(
            f"only {tokens[short[0]]} calibration tokens reached {short[0]}; pass at least "
            f"{MIN_TOKENS} (a longer text, more clips or prompts)"
        )
    log.info("calibrated %d projections on %s", len(covariances), source)
    return CalibrationStats({k: c / tokens[k] for k, c in covariances.items()}, tokens, inputs, source, float(damp))


NORM_DAMP = 1e-6  # folding gains is exact: damping only guards against a gain of zero


def norm_statistics(model: nn.Module, *, damp: float = NORM_DAMP) -> CalibrationStats:
    """Data-free "calibration" by the norms' gains: the LayerNorm / RMSNorm gain ``g`` (and bias ``beta``)
    in front of each projection folded into the scores, as if the normalized inputs were white. It is
    the diagonal special case of :func:`calibrate`: the covariance of ``[g * x + beta, 1]`` for a white
    ``[x, 1]``, so a direction that a large gain amplifies counts for more. No data, no forward pass.

    Raises:
        NotImplementedError: a family that does not declare which norm feeds which projection.
    """
    inputs, projections = _projections(model)
    covariances, tokens = {}, {}
    for name, module, _ in attention_modules(model):
        family = family_for(module)
        if family.norms is None:
            raise NotImplementedError(f"{type(module).__name__} ({family.name}) does not declare its input norms")
        norms = family.norms(model, name)
        for key in (k for k in projections if k.startswith(name + ".")):
            width = projections[key].weight.shape[1 if isinstance(projections[key], nn.Linear) else 0]
            covariances[key] = _gain_covariance(norms[key[len(name) + 1 :]], width)
            tokens[key] = 0
    return CalibrationStats(covariances, tokens, inputs, "the norms' gains (no data)", damp, "norm gains")


def _gain_covariance(norm: nn.Module | None, width: int) -> torch.Tensor:
    """``M^T M`` for ``[y, 1] = [x, 1] M``, ``M = [[diag(g), 0], [beta, 1]]``: the second moment of a
    norm's output (with the bias's column of ones) when its normalized input is white."""
    m = torch.eye(width + 1, dtype=torch.float64)
    gain, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if isinstance(gain, torch.Tensor):
        m[:width, :width] = torch.diag(gain.detach().double().cpu())
    if isinstance(bias, torch.Tensor):
        m[width, :width] = bias.detach().double().cpu()
    return m.T @ m


def _check_length(model: nn.Module, batch: Mapping) -> None:
    ids = batch.get("input_ids")
    limit = position_limit(model)
    if isinstance(ids, torch.Tensor) and limit is not None and ids.shape[-1] > limit:
        raise ValueError(
            f"a calibration batch of {ids.shape[-1]} tokens is longer than this model's {limit} "
            f"positions; cut the text into windows of at most {limit} (text_batches(..., length={limit}))"
        )


def _projections(model: nn.Module) -> tuple[dict[str, dict[str, tuple[str, str | None]]], dict[str, nn.Module]]:
    """Each attention module's sides as projection keys, and the projection modules to hook (each once)."""
    inputs, projections = {}, {}
    for name, module, _ in attention_modules(model):
        family = family_for(module)
        if not family.inputs:
            raise NotImplementedError(
                f"{type(module).__name__} ({family.name}) does not declare the inputs its "
                "pairs read, so it cannot be calibrated; use data-free pruning"
            )
        inputs[name] = {}
        for pair, sides in family.inputs.items():
            keys = tuple(None if side is None else f"{name}.{side}" for side in sides)
            for side, key in zip(sides, keys):
                if key is not None:
                    projections[key] = module.get_submodule(side)
            inputs[name][pair] = keys
    return inputs, projections


def _accumulate(key: str, covariances: dict[str, torch.Tensor], tokens: dict[str, int]):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (rows, d)
        if not torch.isfinite(x).all():
            raise ValueError(
                f"{key} received NaN or inf activations on the calibration data; check the data and the model's dtype"
            )
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (rows, d + 1): the bias's row of ones
        gram = (x.T @ x).double().cpu()  # one call's rows summed in float32, the running total in float64
        covariances[key] = covariances[key] + gram if key in covariances else gram
        tokens[key] += x.shape[0]

    return hook


def _with_progress(batches: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="calibrating", unit="batch")


def text_batches(tokenizer, text: str, *, tokens: int = 4096, length: int = 512) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of a text: its first ``tokens`` tokens in windows of ``length`` (the last
    window may be shorter), as ``{"input_ids": (1, L)}``.

    Raises:
        ValueError: no tokenizer, or a text with fewer than ``MIN_TOKENS`` tokens.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass calibration batches of its own inputs instead")
    for arg, value in (("tokens", tokens), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < MIN_TOKENS:
            raise ValueError(f"{arg}={value!r} must be an integer >= {MIN_TOKENS}")
    ids = tokenizer(text[: tokens * 12], add_special_tokens=False, return_tensors="pt")["input_ids"][0][:tokens]
    if ids.numel() < MIN_TOKENS:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens; at least {MIN_TOKENS} are needed (use a longer text)"
        )
    return [{"input_ids": ids[i : i + length][None]} for i in range(0, ids.numel(), length)]
