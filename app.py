"""CLOVER Studio, the web app: each attention head's spectrum, pruning with CLOVER against the vanilla
baseline, outputs side by side, and the pruned checkpoint to download.

    python app.py                                      # http://127.0.0.1:7860, this machine only
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py   # reachable from the network
    CLOVER_DEFAULT_MODEL=gpt2-tiny-random python app.py

Every number and figure comes from ``clover_core``; this file lays out the page and wires events.
Nothing is loaded at import: models load on first use, are decomposed once, and are shared
read-only by every session (a least-recently-used cache with a memory budget).
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go
import torch
from gradio.utils import get_upload_folder
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from clover_core.zoo import EMBEDDED
from studio import cache as model_cache
from studio import calibration, downloads, heads, outputs
from studio import session as pruning

log = logging.getLogger("clover_studio")

HUB_MODELS = {
    "openai-community/gpt2-xl": "GPT-2 XL (hub download, 1.5B)",
    "openai/whisper-large-v3": "Whisper large-v3 (hub download, 1.5B)",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL base 1.0 UNet (hub download, 2.6B)",
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_RATIO = 0.9
DEFAULT_RATIO = 0.25
PAIR_LABEL = {"qk": "Q-K", "vo": "V-O"}
KIND_LABEL = {"lm": "language", "speech": "speech", "diffusion": "image"}
VARIANT_LABEL = {"original": "original", "vanilla": "vanilla-pruned", "clover": "CLOVER-pruned"}
IMAGE_HEIGHT = 360  # px: the generated images' box
# The browser shows an image at most at its own size: the tiny UNet's 32 x 32 px would be a speck in the
# box. Scaled to fill it, pixels kept sharp; the images themselves (what the API returns) are unchanged.
CSS = ".clover-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"
QUALITY = {  # column title, number format
    "perplexity": ("perplexity (WikiText-2, {n} tokens)", "{:,.2f}"),
    "wer": ("word error rate (bundled clips)", "{:.3f}"),
    "psnr_db": ("PSNR vs unpruned (dB)", "{:.2f}"),
    "ssim": ("SSIM vs unpruned", "{:.4f}"),
}
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, NotImplementedError, OSError)

try:  # Hugging Face Spaces (ZeroGPU): a GPU is attached only while a decorated call runs
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:

    def on_gpu(fn):
        return fn


def model_choices() -> list[tuple[str, str]]:
    """The dropdown: the offline models first (read from ``EMBEDDED`` each time), then hub ids."""
    offline = [(f"{name}  (offline)", name) for name in EMBEDDED]
    return offline + [(f"{name}  ({desc})", name) for name, desc in HUB_MODELS.items()]


def default_model() -> str:
    """``$CLOVER_DEFAULT_MODEL``, else ``smollm2-135m`` when it is embedded, else the first offline model."""
    fallback = "smollm2-135m" if "smollm2-135m" in EMBEDDED else next(iter(EMBEDDED))
    return os.environ.get("CLOVER_DEFAULT_MODEL") or fallback


def default_cache() -> model_cache.ModelCache:
    """Models on ``DEVICE`` within ``$CLOVER_MEMORY_GB`` (default: 60% of the device's memory)."""
    if DEVICE == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = float(os.environ.get("CLOVER_MEMORY_GB", 0)) * 1e9 or 0.6 * total
    return model_cache.ModelCache(
        int(budget), device=DEVICE, allow_local=os.environ.get("CLOVER_ALLOW_LOCAL_MODELS") == "1"
    )


def user_errors(fn):
    """Show bad input and unloadable models as a message in the page, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


# --------------------------------------------------------------------------- figures (layout only)


def heatmap_figure(grids: dict[str, heads.HeadGrid], pairs: tuple[str, ...]) -> go.Figure:
    """Attention module x head: share of energy in the top ``TOP_FRACTION`` of directions, one panel per pair."""
    top = f"top {heads.TOP_FRACTION:.0%}"
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=[PAIR_LABEL[p] for p in ("qk", "vo")],
        shared_yaxes=True,
        horizontal_spacing=0.04 if len(pairs) == 2 else 0.15,
    )  # room for names beside a note
    for col, pair in enumerate(("qk", "vo"), start=1):
        if pair not in pairs:
            _unavailable(fig, col, "not available: rotary position embeddings<br>sit between W_q and W_k")
            fig.update_yaxes(showticklabels=True, row=1, col=3 - col)  # the module names go on the other panel
            continue
        g = grids[pair]
        custom = [[[int(k), float(e), g.head_dim] for k, e in zip(kr, er)] for kr, er in zip(g.kept, g.effective_rank)]
        hover = (
            "%{y}<br>head %{x}<br>energy in the " + top + " %{z:.2f}<br>effective rank %{customdata[1]:.1f}<br>"
            "rank kept %{customdata[0]} of %{customdata[2]}<extra>" + PAIR_LABEL[pair] + "</extra>"
        )
        fig.add_trace(
            go.Heatmap(
                z=g.energy,
                x=list(range(g.energy.shape[1])),
                y=heads.short_names(g.modules),
                customdata=custom,
                coloraxis="coloraxis",
                hovertemplate=hover,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(autorange="reversed")  # both panels: the y axes are matched
    rows = max((len(g.modules) for g in grids.values()), default=4)
    fig.update_layout(
        coloraxis={
            "colorscale": "Viridis",
            "cmin": 0,
            "cmax": 1,
            "colorbar": {"title": {"text": f"energy in<br>{top}"}},
        },
        height=min(1400, max(360, 120 + 16 * rows)),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def curves_figure(
    grids: dict[str, heads.HeadGrid],
    pairs: tuple[str, ...],
    layer: str,
    setting: pruning.Setting,
    cuts: dict[str, float | None],
) -> go.Figure:
    """Singular values of each head of ``layer``; kept directions as dots, removed ones as crosses."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{PAIR_LABEL[p]} of {layer}" for p in ("qk", "vo")])
    first = next((p for p in ("qk", "vo") if p in pairs), None)  # the panel with the legend and the y title
    for col, pair in enumerate(("qk", "vo"), start=1):
        if pair not in pairs:
            _unavailable(fig, col, "not available: rotary position embeddings<br>sit between W_q and W_k")
            continue
        g = grids[pair]
        row = g.modules.index(layer)
        s = g.singular_values[layer]
        colors = head_colors(s.shape[0])  # head h has one color in both panels
        for h in range(s.shape[0]):
            kept = int(g.kept[row, h])
            values = [v if v > 0 else None for v in s[h].tolist()]
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, len(values) + 1)),
                    y=values,
                    mode="lines+markers",
                    name=f"head {h}",
                    legendgroup=f"h{h}",
                    showlegend=pair == first,
                    line={"color": colors[h]},
                    marker={
                        "symbol": ["circle" if i < kept else "x" for i in range(len(values))],
                        "size": 5,
                        "opacity": [1.0 if i < kept else 0.35 for i in range(len(values))],
                        "color": colors[h],
                    },
                    hovertemplate=f"head {h}<br>direction %{{x}}<br>σ %{{y:.4g}}<br>rank kept {kept} of {len(values)}"
                    f"<extra>{PAIR_LABEL[pair]}</extra>",
                ),
                row=1,
                col=col,
            )
        _threshold_line(fig, col, pair, g.kept[row], setting, cuts.get(pair))
        fig.update_xaxes(title_text="direction (by singular value)", row=1, col=col)
        positive = s[s > 0]
        decades = (positive.max() / positive.min()).log10().item() if len(positive) else 0.0
        fig.update_yaxes(
            type="log",
            dtick=1 if decades >= 2 else None,
            exponentformat="power",
            row=1,
            col=col,
            title_text="singular value" if pair == first else None,
        )  # a tick per decade, or finer
    fig.update_layout(height=440, margin={"l": 10, "r": 10, "t": 60, "b": 10}, legend={"font": {"size": 10}})
    return fig


def head_colors(n: int) -> list[str]:
    """``n`` distinct colors, one per head: plotly's qualitative palette up to 10 heads, else samples of
    a continuous scale (GPT-2 XL has 25 heads, more than any qualitative palette)."""
    if n <= len(qualitative.Plotly):
        return qualitative.Plotly[:n]
    return sample_colorscale("Turbo", [i / (n - 1) for i in range(n)])


def _unavailable(fig: go.Figure, col: int, text: str) -> None:
    """A note centred on subplot ``col``'s empty panel, in paper coordinates: plotly draws no axes for a
    panel without traces, so a note placed on its axes' domain lands elsewhere."""
    x, y = (fig.layout[f"{axis}axis{'' if col == 1 else col}"].domain for axis in "xy")
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=sum(x) / 2, y=sum(y) / 2)
    fig.update_xaxes(visible=False, row=1, col=col)
    fig.update_yaxes(visible=False, row=1, col=col)


def _threshold_line(fig: go.Figure, col: int, pair: str, kept, setting: pruning.Setting, cut: float | None) -> None:
    if pair not in (("qk", "vo") if setting.target == "both" else (setting.target,)):
        fig.add_annotation(
            text="not pruned by this target",
            showarrow=False,
            row=1,
            col=col,
            x=0.98,
            y=0.98,
            xref="x domain",
            yref="y domain",
            xanchor="right",
        )
    elif setting.mode == "uniform":
        rank = int(max(kept))
        fig.add_vline(
            x=rank + 0.5,
            line_dash="dash",
            line_color="crimson",
            row=1,
            col=col,
            annotation_text=f"keep {rank}",
            annotation_position="bottom right",
        )
    elif cut is not None:
        fig.add_hline(
            y=cut,
            line_dash="dash",
            line_color="crimson",
            row=1,
            col=col,
            annotation_text=f"global threshold {cut:.3g}",
            annotation_position="bottom right",
        )


# --------------------------------------------------------------------------- text (layout only)


def ranks_markdown(dec, ranks: dict[str, dict[str, list[int]]]) -> str:
    lines = []
    for pair, t in heads.rank_totals(dec, ranks).items():
        lines.append(
            f"**{PAIR_LABEL[pair]}**: {t['kept']:,} of {t['total']:,} directions kept "
            f"(per head {t['min']}..{t['max']}; {t['empty']} heads emptied)"
        )
    if "qk" not in dec.pair_types:
        lines.append("Q-K is not offered: rotary position embeddings make the Q-K product depend on position.")
    return "  \n".join(lines)


def results_markdown(pair: pruning.PrunedPair, quality: dict[str, dict[str, float]]) -> str:
    size = pruning.sizes(pair)
    keys = list(quality["original"])
    head = ["", "parameters", "KV-cache bytes / token"] + [QUALITY[k][0].format(n=pruning.LM_EVAL_TOKENS) for k in keys]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    base = size["original"]
    for variant, label in (("original", "original"), ("vanilla", "vanilla-pruned"), ("clover", "**CLOVER**-pruned")):
        cells = [label]
        for key in ("parameters", "kv_bytes_per_token"):
            value = size[variant][key]
            change = f" ({100 * (value - base[key]) / base[key]:+.1f}%)" if variant != "original" and base[key] else ""
            cells.append(f"{value:,}{change}" if base[key] else "none")
        cells += [QUALITY[k][1].format(quality[variant][k]) for k in keys]
        rows.append("| " + " | ".join(cells) + " |")
    s = pair.setting
    scores = (
        f"scores calibrated on {calibration.describe(pair.loaded)} (never the data the quality is measured on)"
        if s.scores == "calibrated"
        else "data-free scores (the weights alone)"
    )
    return (
        f"**{s.model}**: {PAIR_LABEL.get(s.target, 'Q-K and V-O')} pruned, {s.mode}, ratio {s.ratio:g}; {scores}\n\n"
        + "\n".join(rows)
    )


# --------------------------------------------------------------------------- handlers


def _progress(progress: gr.Progress | None):
    return None if progress is None else (lambda fraction, message: progress(fraction, desc=message))


class Studio:
    """The page's handlers; each is a named API endpoint (see :func:`build_demo`)."""

    def __init__(self, cache: model_cache.ModelCache, scratch: downloads.ScratchFolder):
        self.cache, self.scratch = cache, scratch

    def load_model(self, model: str, progress=gr.Progress(track_tqdm=True)):
        """Load and decompose ``model`` (once); say why in the status when it cannot load."""
        try:
            loaded = self.cache.get(model, _progress(progress))
        except Exception as e:  # noqa: BLE001 - any hub model can fail in its own way; the page says how
            log.warning("cannot load %s", model, exc_info=not isinstance(e, USER_ERRORS))
            return (
                f"**Cannot load `{model}`**: {type(e).__name__ if not str(e) else e}",
                gr.update(),
                gr.update(choices=[], value=None),
                *_panels(None),
            )
        pairs = loaded.dec.pair_types
        if "qk" in pairs:
            target = gr.update(choices=[("Q-K", "qk"), ("V-O", "vo"), ("both", "both")])
            note = ""
        else:
            target = gr.update(choices=[("V-O only (rotary Q-K cannot be pruned)", "vo")], value="vo")
            note = " Rotary position embeddings (Llama family) sit between W_q and W_k, so only **V-O** can be pruned."
        names = list(loaded.dec.modules)
        layer = gr.update(choices=list(zip(heads.short_names(names), names)), value=names[0])
        status = (
            f"**{model}** ({KIND_LABEL[loaded.kind]} model) on {self.cache.device}: {len(names)} "
            f"attention modules, decomposed once ({loaded.nbytes / 1e9:.2f} GB with the decomposition).{note}"
        )
        return status, target, layer, *_panels(loaded.kind)

    def spectra(
        self,
        model: str,
        ratio: float,
        target: str,
        mode: str,
        layer: str | None = None,
        scores: str = "data-free",
        progress=gr.Progress(track_tqdm=True),
    ):
        """Heatmap of every head's concentration, a layer's singular values, and the kept ranks (no SVD
        once the model, and for calibrated scores its calibration, are decomposed)."""
        setting = _setting(model, ratio, target, mode, scores)  # bad settings: an error message
        try:
            loaded = self.cache.get(model, _progress(progress))
            dec = calibration.decomposition(loaded, setting.scores, _progress(progress))
        except USER_ERRORS as e:
            return None, None, f"No spectra: {e}"
        ranks = heads.kept_ranks(dec, setting.ratio, setting.target, setting.mode)
        grids = {p: heads.head_grid(dec, p, ranks[p]) for p in dec.pair_types}
        layer = layer if layer in dec.modules else next(iter(dec.modules))
        cuts = heads.cut_score(dec, setting.ratio, setting.target, setting.mode) if setting.mode == "global" else {}
        return (
            heatmap_figure(grids, dec.pair_types),
            curves_figure(grids, dec.pair_types, layer, setting, cuts),
            ranks_markdown(dec, ranks),
        )

    def prune(
        self, model: str, ratio: float, target: str, mode: str, state, scores="data-free", progress=gr.Progress()
    ):
        """Vanilla- and CLOVER-pruned models at this setting: sizes and measured quality."""
        try:
            loaded = self.cache.get(model, _progress(progress))
        except USER_ERRORS as e:
            return f"Nothing pruned: {e}", state
        pair = self._pair(loaded, model, ratio, target, mode, state, progress, scores)
        return results_markdown(pair, pruning.measure_quality(pair, _progress(progress))), pair

    def compare_text(
        self, model, ratio, target, mode, prompt, max_new_tokens, state, scores="data-free", progress=gr.Progress()
    ):
        """The same prompt continued greedily by the original, vanilla and CLOVER models."""
        loaded = self._loaded(model, "lm", progress)
        pair = self._pair(loaded, model, ratio, target, mode, state, progress, scores)
        out = {
            v: outputs.complete_text(m, pair.loaded.processor, prompt, max_new_tokens) for v, m in pair.models().items()
        }
        return out["original"], out["vanilla"], out["clover"], pair

    def compare_audio(
        self, model, ratio, target, mode, clip, audio=None, state=None, scores="data-free", progress=gr.Progress()
    ):
        """Transcripts of a bundled clip (with word error rates) or of an uploaded / recorded one."""
        from clover_core.audio import bundled_clips
        from clover_core.metrics import word_error_rate

        if audio:
            samples, reference = outputs.read_audio(audio), None
        elif clip:
            clips = bundled_clips()
            if clip not in clips:
                raise ValueError(f"clip={clip!r} is not bundled; choose one of {', '.join(clips)}")
            samples, reference = outputs.read_audio(clips[clip][0]), clips[clip][1]
        else:
            raise ValueError("no audio: choose a bundled clip, or upload or record one")
        loaded = self._loaded(model, "speech", progress)
        pair = self._pair(loaded, model, ratio, target, mode, state, progress, scores)
        out = {v: outputs.transcribe_clip(m, pair.loaded.processor, samples) for v, m in pair.models().items()}
        note = (
            ""
            if reference is None
            else f"Reference: *{reference}*  \nWord error rate: "
            + ", ".join(f"{v} {word_error_rate(reference, t):.3f}" for v, t in out.items())
        )
        return out["original"], out["vanilla"], out["clover"], note, pair

    def compare_images(
        self, model, ratio, target, mode, prompt, seed, steps, state, scores="data-free", progress=gr.Progress()
    ):
        """Images of one prompt, seed and scheduler from the original, vanilla and CLOVER UNets."""
        from clover_core.metrics import psnr, ssim

        loaded = self._loaded(model, "diffusion", progress)
        pair = self._pair(loaded, model, ratio, target, mode, state, progress, scores)
        images = {v: outputs.make_image(loaded.processor, m, prompt, seed, steps) for v, m in pair.models().items()}
        ref = images["original"]
        note = "vs the original: " + ", ".join(
            f"{v} PSNR {psnr(ref, images[v]):.2f} dB, SSIM {ssim(ref, images[v]):.3f}" for v in ("vanilla", "clover")
        )
        return (*[outputs.to_uint8(images[v]) for v in pruning.VARIANTS], note, pair)

    def download(self, model, ratio, target, mode, state, scores="data-free", progress=gr.Progress()):
        """The CLOVER-pruned checkpoint (``save_pruned`` folder, zipped); files older than an hour are swept."""
        self.scratch.sweep()
        loaded = self.cache.get(model, _progress(progress))
        pair = self._pair(loaded, model, ratio, target, mode, state, progress, scores)
        if progress is not None:
            progress(0.9, desc="saving the checkpoint")
        return str(downloads.export_checkpoint(pair, self.scratch.new_dir("checkpoint-"))), pair

    def _loaded(self, model: str, kind: str, progress) -> model_cache.Loaded:
        loaded = self.cache.get(model, _progress(progress))
        if loaded.kind != kind:
            article = "an" if KIND_LABEL[loaded.kind][0] in "aeiou" else "a"
            raise ValueError(
                f"{model} is {article} {KIND_LABEL[loaded.kind]} model; this comparison is for "
                f"{KIND_LABEL[kind]} models (its panel shows when such a model is loaded)"
            )
        return loaded

    @staticmethod
    def _pair(loaded, model, ratio, target, mode, state, progress, scores="data-free") -> pruning.PrunedPair:
        current = state if isinstance(state, pruning.PrunedPair) else None
        setting = _setting(model, ratio, target, mode, scores)
        return pruning.pruned_pair(loaded, setting, current, _progress(progress))


def _setting(model: str, ratio: float, target: str, mode: str, scores: str = "data-free") -> pruning.Setting:
    if ratio is None or not 0 <= float(ratio) <= MAX_RATIO:
        raise ValueError(f"ratio={ratio!r} is outside this app's range 0..{MAX_RATIO}")
    return pruning.Setting(model, float(ratio), target, mode, scores or "data-free")


def _panels(kind: str | None) -> list[dict]:
    return [gr.update(visible=kind == k) for k in ("lm", "speech", "diffusion")]


# --------------------------------------------------------------------------- page

INTRO = """# CLOVER Studio
Each attention head's Q-K and V-O pairs, rewritten exactly in their singular-vector basis
([CLOVER](https://arxiv.org/abs/2411.17426)): concentrated heads can lose their weakest directions at
little cost. Pick a model, move the ratio, and compare CLOVER pruning with the vanilla baseline
(dropping original head dimensions) at the same number of kept directions."""
CLICK_DOWNLOAD = "() => { const a = document.querySelector('#checkpoint a[download]'); if (a) a.click(); }"


def _clip_names() -> list[str]:
    from clover_core.audio import bundled_clips

    try:
        return list(bundled_clips())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        log.warning("no bundled clips: %s", e)
        return []


def build_demo(
    cache: model_cache.ModelCache | None = None, scratch: downloads.ScratchFolder | None = None
) -> gr.Blocks:
    """The page, with every action a named API endpoint; nothing is loaded until a request needs it.

    Args:
        cache: the shared model cache (default: :func:`default_cache`).
        scratch: where checkpoints are zipped (default: a folder in Gradio's cache, swept hourly).
    """
    studio = Studio(
        cache or default_cache(), scratch or downloads.ScratchFolder(os.path.join(get_upload_folder(), "clover"))
    )
    studio.scratch.start_sweeping()  # old downloads go on schedule, not only on the next one
    with gr.Blocks(title="CLOVER Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        ui = SimpleNamespace(state=gr.State(None, time_to_live=3600))  # this session's pruned models
        _controls(ui)
        with gr.Tab("Spectra"):
            ui.heatmap = gr.Plot(label="How concentrated each head is", elem_id="heatmap")
            ui.layer = gr.Dropdown(label="Layer (attention module) for the curves", allow_custom_value=True)
            ui.curves = gr.Plot(label="Singular values; dashed: the pruning threshold", elem_id="curves")
            ui.ranks = gr.Markdown(elem_id="ranks")
        with gr.Tab("Compare outputs"):
            _compare_panels(ui)
        with gr.Tab("Download"):
            ui.download = gr.Button("Download the CLOVER-pruned checkpoint (.zip)", variant="primary")
            ui.checkpoint = gr.File(
                label="Checkpoint (safetensors; load with clover_core.load_pruned)", elem_id="checkpoint"
            )
        gr.Markdown(
            f"One request runs at a time; when {_queue_size()} are waiting, new ones are turned away "
            "with a busy message. Pruned models and downloads are kept for an hour."
        )
        _wire(demo, studio, ui)
    demo.queue(max_size=_queue_size(), default_concurrency_limit=1)
    return demo


def _controls(ui: SimpleNamespace) -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        ui.model = gr.Dropdown(
            model_choices(),
            value=default_model(),
            label="Model",
            allow_custom_value=True,
            info="an offline model, or type a Hugging Face hub id",
            scale=2,
        )
        ui.status = gr.Markdown("Loading the model ...", elem_id="status")
    with gr.Row():
        ui.ratio = gr.Slider(
            0,
            MAX_RATIO,
            value=DEFAULT_RATIO,
            step=0.05,
            elem_id="ratio",
            label="Pruning ratio (share of directions removed)",
        )
        # V-O to start with: every model has it (a rotary model has no Q-K pair), so the API's defaults work
        ui.target = gr.Radio([("Q-K", "qk"), ("V-O", "vo"), ("both", "both")], value="vo", label="Target")
        ui.mode = gr.Radio(
            [("uniform: same rank in every head", "uniform"), ("global: one threshold", "global")],
            value="uniform",
            label="Mode",
        )
        ui.scores = gr.Radio(
            [("data-free: the weights alone", "data-free"), ("calibrated: on bundled data", "calibrated")],
            value="data-free",
            label="Scores",
            info="calibrated: weighed by the activations on data the quality is never measured on (once per model)",
        )
    ui.results = gr.Markdown(elem_id="results")


def _compare_panels(ui: SimpleNamespace) -> None:
    """One panel per kind of model; the loaded model's kind decides which one shows."""
    with gr.Column(visible=True) as ui.text_panel:
        ui.prompt = gr.Textbox(
            "The history of the city",
            label=f"Prompt (up to {outputs.MAX_PROMPT_TOKENS} tokens)",
            max_length=4 * outputs.MAX_PROMPT_TOKENS,
        )
        ui.new_tokens = gr.Slider(1, outputs.MAX_NEW_TOKENS, value=40, step=1, label="New tokens (greedy)")
        ui.text_btn = gr.Button("Generate", variant="primary")
        with gr.Row():
            ui.texts = [gr.Textbox(label=VARIANT_LABEL[v], lines=6, elem_id=f"text-{v}") for v in pruning.VARIANTS]
    with gr.Column(visible=False) as ui.audio_panel:
        clips = _clip_names()
        with gr.Row():
            ui.clip = gr.Dropdown(clips, value=clips[0] if clips else None, label="Bundled clip")
            ui.audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label=f"... or upload / record (up to {outputs.MAX_AUDIO_SECONDS:g} s)",
            )
        ui.audio_btn = gr.Button("Transcribe", variant="primary")
        with gr.Row():
            ui.transcripts = [gr.Textbox(label=VARIANT_LABEL[v], lines=3) for v in pruning.VARIANTS]
        ui.audio_note = gr.Markdown()
    with gr.Column(visible=False) as ui.image_panel:
        with gr.Row():
            ui.image_prompt = gr.Textbox(outputs.IMAGE_PROMPT, label="Prompt", max_length=300, scale=3)
            ui.seed = gr.Number(0, label="Seed", precision=0)
            ui.steps = gr.Slider(1, outputs.MAX_IMAGE_STEPS, value=20, step=1, label="Steps")
        ui.image_btn = gr.Button("Generate images", variant="primary")
        with gr.Row():
            ui.images = [
                gr.Image(label=VARIANT_LABEL[v], type="numpy", height=IMAGE_HEIGHT, elem_classes=["clover-image"])
                for v in pruning.VARIANTS
            ]
        ui.image_note = gr.Markdown()


def _wire(demo: gr.Blocks, studio: Studio, ui: SimpleNamespace) -> None:
    """Events: heavy work runs one at a time ("engine"); the slider acts on release, never while dragged."""
    setting, engine = [ui.model, ui.ratio, ui.target, ui.mode], {"concurrency_id": "engine", "concurrency_limit": 1}
    spectra_out, prune_out = [ui.heatmap, ui.curves, ui.ranks], [ui.results, ui.state]
    scores = [ui.scores]  # last in every list: the API's older calls without it keep working (data-free)
    spectra, prune = wire(studio.spectra), wire(studio.prune)
    loading = gr.on(
        [demo.load, ui.model.input],
        wire(studio.load_model),
        [ui.model],
        [ui.status, ui.target, ui.layer, ui.text_panel, ui.audio_panel, ui.image_panel],
        api_name="load_model",
        **engine,
    )
    loading.then(
        spectra,
        [*setting, ui.layer, *scores],
        spectra_out,
        api_name="spectra_on_load",
        api_visibility="private",
        **engine,
    ).then(
        prune, [*setting, ui.state, *scores], prune_out, api_name="prune_on_load", api_visibility="private", **engine
    )
    changed = gr.on(
        [ui.ratio.release, ui.target.input, ui.mode.input, ui.scores.input],
        spectra,
        [*setting, ui.layer, *scores],
        spectra_out,
        api_name="spectra",
        trigger_mode="always_last",
        **engine,
    )
    changed.then(prune, [*setting, ui.state, *scores], prune_out, api_name="prune", **engine)
    ui.layer.input(
        spectra,
        [*setting, ui.layer, *scores],
        spectra_out,
        api_name="spectra_of_layer",
        api_visibility="private",
        **engine,
    )
    ui.text_btn.click(
        wire(studio.compare_text),
        [*setting, ui.prompt, ui.new_tokens, ui.state, *scores],
        [*ui.texts, ui.state],
        api_name="compare_text",
        **engine,
    )
    ui.audio_btn.click(
        wire(studio.compare_audio),
        [*setting, ui.clip, ui.audio, ui.state, *scores],
        [*ui.transcripts, ui.audio_note, ui.state],
        api_name="compare_audio",
        **engine,
    )
    ui.image_btn.click(
        wire(studio.compare_images),
        [*setting, ui.image_prompt, ui.seed, ui.steps, ui.state, *scores],
        [*ui.images, ui.image_note, ui.state],
        api_name="compare_images",
        **engine,
    )
    ui.download.click(
        wire(studio.download), [*setting, ui.state, *scores], [ui.checkpoint, ui.state], api_name="download", **engine
    ).success(None, js=CLICK_DOWNLOAD)  # one button: the browser saves the file at once
    # A bundled clip replaces an upload, and the other way round.
    ui.clip.input(lambda: None, None, ui.audio, api_name="clip_chosen", api_visibility="private", queue=False)
    ui.audio.input(
        lambda a: gr.update() if a is None else None,
        ui.audio,
        ui.clip,
        api_name="audio_given",
        api_visibility="private",
        queue=False,
    )


def wire(fn):
    """A handler as the page runs it: on a Spaces GPU when there is one, user errors shown as messages."""
    return on_gpu(user_errors(fn))


def _queue_size() -> int:
    return int(os.environ.get("CLOVER_QUEUE_SIZE", 16))


def server_address(environ: dict[str, str] | None = None) -> tuple[str, int]:
    """Where the app listens: ``127.0.0.1`` (this machine only) unless ``GRADIO_SERVER_NAME`` says
    otherwise (the Docker image sets ``0.0.0.0``), on ``GRADIO_SERVER_PORT``, else ``PORT`` (as hosting
    platforms set it), else 7860.

    Raises:
        ValueError: a port that is not a number in 1..65535 (the message names the variable).
    """
    environ = os.environ if environ is None else environ
    name = environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    var = next((v for v in ("GRADIO_SERVER_PORT", "PORT") if environ.get(v)), None)
    if var is None:
        return name, 7860
    value = environ[var]
    if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{var}={value!r} is not a port; set it to a number in 1..65535, e.g. 7860")
    return name, int(value)


def launch_options() -> dict:
    """What :meth:`gr.Blocks.launch` needs beyond the address: uploads are refused above the audio cap,
    and the page's style (``CSS``)."""
    return {"max_file_size": f"{outputs.MAX_AUDIO_BYTES // 2**20}mb", "css": CSS}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    host, port = server_address()
    build_demo().launch(server_name=host, server_port=port, **launch_options())
