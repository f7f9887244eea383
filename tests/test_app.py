"""The web app's handlers, called directly: spectra, pruning, comparisons and downloads on real
(tiny) models, the session state, the model cache, and the errors a user sees."""

import json
import os
import re
import time
import wave
import zipfile

import gradio as gr
import numpy as np
import pytest
import torch

import app
from clover_core import load_pruned
from clover_core.audio import bundled_clips
from clover_core.zoo import EMBEDDED
from studio import cache as model_cache
from studio import downloads, heads, outputs
from studio import session as pruning

from .tolerances import FP32, SHOWN_RATIO0_REL

LM = "gpt2-tiny-random"  # GPT-2 architecture, random weights: 4 layers, 4 heads of 64


@pytest.fixture(autouse=True)
def short_eval(monkeypatch):
    monkeypatch.setattr(pruning, "LM_EVAL_TOKENS", 128)  # the page uses 512; 128 keeps the tests quick


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return app.Studio(model_cache.ModelCache(8 * 2**30), downloads.ScratchFolder(tmp_path_factory.mktemp("scratch")))


def call(fn, *args, **kwargs):
    """A handler as the page calls it: user errors become ``gr.Error``."""
    return app.user_errors(fn)(*args, **kwargs)


def kept_in_heatmap(fig) -> np.ndarray:
    """The "rank kept" of every head, read back from the heatmap's hover data: (pairs, modules, heads)."""
    return np.array(
        [[[cell[0] for cell in row] for row in trace.customdata] for trace in fig.data if trace.type == "heatmap"]
    )


def table(markdown: str) -> dict[str, list[str]]:
    """Rows of the results table by their first cell (markup removed)."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip().replace("*", ""): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_building_the_page_loads_no_model_and_names_every_action(tmp_path):
    cache = model_cache.ModelCache(2**30)
    demo = app.build_demo(cache, downloads.ScratchFolder(tmp_path))
    assert isinstance(demo, gr.Blocks) and cache.names() == []
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"load_model", "spectra", "prune", "compare_text", "compare_audio", "compare_images", "download"}
    assert demo._queue.max_size == 16


def test_model_choices_follow_embedded_and_the_environment(monkeypatch):
    values = [value for _, value in app.model_choices()]
    assert values == [*EMBEDDED, *app.HUB_MODELS]
    monkeypatch.setitem(EMBEDDED, "added-later", ("a model registered after import", lambda: None))
    assert "added-later" in [value for _, value in app.model_choices()]
    monkeypatch.delenv("CLOVER_DEFAULT_MODEL", raising=False)
    assert app.default_model() == "smollm2-135m"
    monkeypatch.setenv("CLOVER_DEFAULT_MODEL", LM)
    assert app.default_model() == LM


@pytest.mark.parametrize(
    "environ,address",
    [
        ({}, ("127.0.0.1", 7860)),  # this machine only, by default
        ({"PORT": "8000"}, ("127.0.0.1", 8000)),  # hosting platforms set PORT
        ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "9000", "PORT": "8000"}, ("0.0.0.0", 9000)),
    ],
)
def test_the_app_listens_on_loopback_unless_told_otherwise(environ, address):
    assert app.server_address(environ) == address


def test_a_bad_port_names_the_variable():
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT='http' is not a port"):
        app.server_address({"GRADIO_SERVER_PORT": "http"})


def test_unloadable_models_say_why_in_the_page(studio, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, *_, text_panel, audio_panel, image_panel = studio.load_model("no-such-owner/no-such-model")
    assert status.startswith("**Cannot load `no-such-owner/no-such-model`**") and "Offline models" in status
    assert not any(p["visible"] for p in (text_panel, audio_panel, image_panel))
    assert "local models are disabled" in studio.load_model("/etc")[0]
    assert studio.spectra("/etc", 0.5, "qk", "uniform", None)[:2] == (None, None)
    assert studio.prune("/etc", 0.5, "qk", "uniform", None)[0].startswith("Nothing pruned")


@pytest.mark.slow
def test_slider_settings_reuse_the_decomposition(studio, monkeypatch):
    status, target, layer, text_panel, *_ = studio.load_model(LM)
    assert f"**{LM}**" in status and text_panel["visible"] and layer["value"] == "transformer.h.0.attn"

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran after the model was decomposed")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "qr", no_svd)
    for ratio in (0.25, 0.75):
        heatmap, curves, ranks = studio.spectra(LM, ratio, "qk", "uniform", "transformer.h.1.attn")
        kept = kept_in_heatmap(heatmap)
        assert kept.shape == (2, 4, 4)  # Q-K and V-O panels, 4 layers x 4 heads
        assert (kept[0] == round(64 * (1 - ratio))).all() and (kept[1] == 64).all()  # V-O is not the target
        (line,) = [s for s in curves.layout.shapes if s.x0 == s.x1]
        assert line.x0 == round(64 * (1 - ratio)) + 0.5
        assert f"{int(4 * 4 * 64 * (1 - ratio)):,} of 1,024" in ranks
    md, pair = studio.prune(LM, 0.75, "both", "uniform", None)
    assert isinstance(pair, pruning.PrunedPair) and "Q-K and V-O pruned" in md


def test_global_mode_draws_one_threshold_and_ranks_vary(studio):
    heatmap, curves, ranks = studio.spectra(LM, 0.5, "qk", "global", None)
    kept = kept_in_heatmap(heatmap)[0]
    assert kept.sum() == 512 and kept.min() < kept.max()  # half of all directions, unevenly per head
    cut = heads.cut_score(studio.cache.get(LM).dec, 0.5, "qk", "global")["qk"]
    (line,) = [s for s in curves.layout.shapes if s.y0 == s.y1]
    assert line.y0 == pytest.approx(cut) and cut > 0


def test_prune_reports_sizes_and_measured_quality(studio):
    md, _ = studio.prune(LM, 0.5, "qk", "uniform", None)
    rows = table(md)
    assert list(rows) == ["original", "vanilla-pruned", "CLOVER-pruned"]
    assert rows["original"][1] == "8,192"  # K and V of 4 layers x 256 features x 4 bytes
    assert rows["vanilla-pruned"][1] == rows["CLOVER-pruned"][1] == "6,144 (-25.0%)"  # half of K
    assert rows["vanilla-pruned"][0] == rows["CLOVER-pruned"][0] != rows["original"][0]
    assert rows["CLOVER-pruned"][2] != rows["original"][2]  # pruning changes the perplexity ...
    md0, _ = studio.prune(LM, 0.0, "qk", "uniform", None)
    rows0 = table(md0)
    ppl0 = {row: float(cells[2].split()[0].replace(",", "")) for row, cells in rows0.items()}
    for row in ("vanilla-pruned", "CLOVER-pruned"):  # ... ratio 0 does not
        assert ppl0[row] == pytest.approx(ppl0["original"], rel=SHOWN_RATIO0_REL)


def test_calibrated_scores_prune_both_methods_and_say_which_data(studio, tmp_path):
    md, pair = studio.prune(LM, 0.5, "vo", "uniform", None, "calibrated")
    assert "scores calibrated on 2,048 tokens of Paradise Lost" in md  # named beside the results
    assert pair.clover.config.clover["calibration"]["data"] == "2,048 tokens of Paradise Lost"
    assert pair.vanilla.config.clover["calibration"] == pair.clover.config.clover["calibration"]  # both use it
    free = table(studio.prune(LM, 0.5, "vo", "uniform", pair)[0])
    assert "data-free scores" in studio.prune(LM, 0.5, "vo", "uniform", pair)[0]
    assert table(md)["CLOVER-pruned"][2] != free["CLOVER-pruned"][2]  # the statistics change the kept directions
    assert table(md)["CLOVER-pruned"][:2] == free["CLOVER-pruned"][:2]  # at the same sizes
    zero = table(studio.prune(LM, 0.0, "vo", "uniform", None, "calibrated")[0])
    ppl = {row: float(cells[2].split()[0].replace(",", "")) for row, cells in zero.items()}
    assert ppl["CLOVER-pruned"] == pytest.approx(ppl["original"], rel=SHOWN_RATIO0_REL)  # exact at full rank
    heatmap, curves, ranks = studio.spectra(LM, 0.5, "vo", "uniform", None, "calibrated")
    assert heatmap is not None and "directions kept" in ranks
    path, _ = studio.download(LM, 0.5, "vo", "uniform", None, "calibrated")
    assert path.endswith("-calibrated.zip")
    with pytest.raises(gr.Error, match="scores='whitened' is not offered"):
        call(studio.prune, LM, 0.5, "vo", "uniform", None, "whitened")


def test_session_state_is_reused_until_the_setting_changes(studio):
    _, pair = studio.prune(LM, 0.5, "vo", "uniform", None)
    *texts, same = studio.compare_text(LM, 0.5, "vo", "uniform", "The city", 4, pair)
    assert same is pair and pair.quality is not None
    *_, other = studio.compare_text(LM, 0.25, "vo", "uniform", "The city", 4, pair)
    assert other is not pair and other.setting.ratio == 0.25


def test_compare_text_is_greedy_and_capped(studio):
    original, vanilla, clover, pair = studio.compare_text(LM, 0.0, "qk", "uniform", "The history of", 6, None)
    loaded = studio.cache.get(LM)
    assert original == outputs.complete_text(loaded.model, loaded.processor, "The history of", 6) == vanilla == clover
    assert len(loaded.processor(original)["input_ids"]) >= 3  # new text, not an echo of the prompt
    with pytest.raises(gr.Error, match="over the cap of 256"):
        call(studio.compare_text, LM, 0.0, "qk", "uniform", "word " * 300, 6, pair)
    with pytest.raises(gr.Error, match="max_new_tokens=500"):
        call(studio.compare_text, LM, 0.0, "qk", "uniform", "The", 500, pair)
    with pytest.raises(gr.Error, match="prompt is empty"):
        call(studio.compare_text, LM, 0.0, "qk", "uniform", "  ", 6, pair)
    with pytest.raises(gr.Error, match="for speech models"):
        call(studio.compare_audio, LM, 0.0, "qk", "uniform", "hello_world", None, pair)


@pytest.mark.parametrize(
    "ratio, target, mode, message",
    [
        (0.95, "qk", "uniform", "outside this app's range 0..0.9"),
        (0.5, "kv", "uniform", "target='kv' is not supported"),
        (0.5, "qk", "threshold", "mode='threshold' is not offered"),
    ],
)
def test_bad_settings_name_the_argument(studio, ratio, target, mode, message):
    with pytest.raises(gr.Error, match=re.escape(message)):
        call(studio.spectra, LM, ratio, target, mode, None)


def test_rotary_models_offer_only_vo(make_llama, tmp_path):
    cache = model_cache.ModelCache(2**30, loaders={"tiny-llama": lambda: (make_llama(), None)})
    studio = app.Studio(cache, downloads.ScratchFolder(tmp_path))
    status, target, *_ = studio.load_model("tiny-llama")
    assert target["choices"] == [("V-O only (rotary Q-K cannot be pruned)", "vo")] and target["value"] == "vo"
    assert "only **V-O**" in status
    with pytest.raises(gr.Error, match="rotary position embeddings"):
        call(studio.spectra, "tiny-llama", 0.5, "qk", "uniform", None)
    heatmap, curves, ranks = studio.spectra("tiny-llama", 0.5, "vo", "uniform", None)
    assert kept_in_heatmap(heatmap).shape == (1, 2, 2)  # V-O only: 2 layers x 2 KV groups
    assert "Q-K is not offered" in ranks
    for fig in (heatmap, curves):  # the note sits on the empty Q-K panel (plotly draws no axes there)
        note = next(a for a in fig.layout.annotations if "rotary" in a.text)
        left, right = fig.layout.xaxis.domain
        assert (note.xref, note.yref) == ("paper", "paper") and left < note.x < right
        assert fig.layout.xaxis.visible is False
    assert heatmap.layout.yaxis2.showticklabels  # the module names, beside the V-O panel
    assert {t.name for t in curves.data if t.showlegend} == {"head 0", "head 1"}  # the legend, from V-O


def test_download_is_a_zipped_checkpoint_that_loads_back(studio, tmp_path):
    _, pair = studio.prune(LM, 0.5, "both", "global", None)
    path, same = studio.download(LM, 0.5, "both", "global", pair)
    assert same is pair and path.endswith(f"{LM}-clover-both-global-0.5.zip")
    assert os.path.commonpath([path, studio.scratch.root]) == str(studio.scratch.root)
    with zipfile.ZipFile(path) as zf:
        zf.extractall(tmp_path)
    folder = tmp_path / f"{LM}-clover-both-global-0.5"
    assert json.loads((folder / "config.json").read_text())["clover"]["method"] == "clover"
    assert (folder / "tokenizer.json").is_file()
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(folder)(ids).logits, pair.clover(ids).logits, **FP32)


def test_scratch_folder_sweeps_only_old_entries(tmp_path):
    scratch = downloads.ScratchFolder(tmp_path, max_age_s=3600)
    old, new = scratch.new_dir("old-"), scratch.new_dir("new-")
    (old / "model.safetensors").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert scratch.sweep() == 1 and not old.exists() and new.exists()


def test_scratch_folder_is_swept_on_a_schedule(tmp_path):
    scratch = downloads.ScratchFolder(tmp_path, max_age_s=30)
    kept, stale = scratch.new_dir("kept-"), scratch.new_dir("stale-")
    long_ago = time.time() - 60
    os.utime(stale, (long_ago, long_ago))
    stop = scratch.start_sweeping(interval_s=0.05)
    try:
        deadline = time.time() + 10
        while stale.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert not stale.exists(), "the sweeper never removed the stale folder"
        time.sleep(0.2)  # a few more sweeps
        assert kept.exists()
    finally:
        stop.set()
    with pytest.raises(ValueError, match="interval_s=0"):
        scratch.start_sweeping(interval_s=0)


def test_model_cache_loads_once_and_evicts_the_least_recent(make_gpt2):
    calls = []

    def loader(seed):
        def load():
            calls.append(seed)
            return make_gpt2("3x16", seed=seed), None

        return load

    cache = model_cache.ModelCache(2**30, loaders={"a": loader(0), "b": loader(1), "c": loader(2)})
    a, b = cache.get("a"), cache.get("b")
    assert cache.get("a") is a and calls == [0, 1]  # loaded once; a is now the most recently used
    assert a.nbytes == b.nbytes > model_cache.nbytes(a.model)  # the decomposition counts too
    cache.budget_bytes = int(2.5 * a.nbytes)  # room for two
    cache.get("c")
    assert cache.names() == ["a", "c"]  # b, the least recently used, went
    assert cache.get("b") is not b and calls == [0, 1, 2, 1]


def _write_wav(path, seconds: float, sr: int = 16000):
    t = np.arange(int(seconds * sr)) / sr
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(samples.tobytes())
    return path


@pytest.mark.real_weights
@pytest.mark.slow
def test_speech_compare_and_quality_with_real_whisper_tiny_en(studio, tmp_path, monkeypatch):
    clips = bundled_clips()
    monkeypatch.setattr("clover_core.audio.bundled_clips", lambda: {"hello_world": clips["hello_world"]})  # quicker
    status, target, layer, text_panel, audio_panel, image_panel = studio.load_model("whisper-tiny.en")
    assert audio_panel["visible"] and not text_panel["visible"] and "speech model" in status
    original, vanilla, clover, note, pair = studio.compare_audio(
        "whisper-tiny.en", 0.0, "qk", "uniform", "hello_world", None, None
    )
    assert original == vanilla == clover and original.lower().startswith("hello")
    assert "Word error rate: original 0.000, vanilla 0.000, clover 0.000" in note
    with pytest.raises(gr.Error, match="longer than the cap max_seconds=30"):
        call(
            studio.compare_audio,
            "whisper-tiny.en",
            0.0,
            "qk",
            "uniform",
            None,
            _write_wav(tmp_path / "l.wav", 31),
            pair,
        )
    with pytest.raises(gr.Error, match="no audio"):
        call(studio.compare_audio, "whisper-tiny.en", 0.0, "qk", "uniform", None, None, pair)
    md, _ = studio.prune("whisper-tiny.en", 0.0, "qk", "uniform", pair)
    rows = table(md)
    assert rows["original"][2] == rows["vanilla-pruned"][2] == rows["CLOVER-pruned"][2]  # WER, unchanged at 0


@pytest.mark.slow
def test_image_compare_and_quality_with_sdxl_tiny_random(studio, monkeypatch):
    monkeypatch.setattr(pruning, "IMAGE_STEPS", 3)  # the quality image; the page uses 8
    *_, image_panel = studio.load_model("sdxl-tiny-random")
    assert image_panel["visible"]
    md, pair = studio.prune("sdxl-tiny-random", 0.5, "both", "uniform", None)
    rows = table(md)
    assert rows["original"][1] == "none" and rows["original"][2:] == ["inf", "1.0000"]  # a UNet caches nothing
    assert float(rows["CLOVER-pruned"][2]) < 100 and float(rows["CLOVER-pruned"][3]) < 1  # pruning shows
    first = studio.compare_images("sdxl-tiny-random", 0.0, "both", "uniform", "a red barn", 3, 2, None)
    assert first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8
    assert np.array_equal(first[0], first[1]) and np.array_equal(first[0], first[2])  # ratio 0: same image
    # ratio 0 is the original up to float rounding (pruned projections add up their features in another order)
    assert all(float(x) > 100 for x in re.findall(r"PSNR (\S+) dB", first[3])), first[3]
    again = studio.compare_images("sdxl-tiny-random", 0.0, "both", "uniform", "a red barn", 3, 2, first[4])
    assert np.array_equal(again[0], first[0])  # same prompt, seed and scheduler: the same image
    with pytest.raises(gr.Error, match="steps=99"):
        call(studio.compare_images, "sdxl-tiny-random", 0.0, "both", "uniform", "a red barn", 3, 99, first[4])


def test_curves_color_each_head_alike_in_both_panels_and_label_narrow_log_ranges():
    import numpy as np

    from studio.heads import HeadGrid

    def grid(pair, s):
        n, k = s.shape
        return HeadGrid(
            pair=pair,
            modules=["m"],
            energy=np.zeros((1, n)),
            effective_rank=np.full((1, n), float(k)),
            kept=np.full((1, n), k),
            head_dim=k,
            singular_values={"m": s},
        )

    wide = torch.logspace(1, -7, 16).repeat(3, 1)  # eight decades (Whisper's Q-K)
    narrow = torch.linspace(2.0, 1.0, 16).repeat(3, 1)  # under one decade (the tiny SDXL UNet)
    fig = app.curves_figure(
        {"qk": grid("qk", wide), "vo": grid("vo", narrow)},
        ("qk", "vo"),
        "m",
        pruning.Setting("x", 0.0, "vo", "uniform"),
        {},
    )
    colors = {(t.xaxis, t.name): t.line.color for t in fig.data}
    assert len({colors["x", f"head {h}"] for h in range(3)}) == 3
    assert all(colors["x", f"head {h}"] == colors["x2", f"head {h}"] for h in range(3))
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis2.dtick is None  # a tick per decade, or plotly's finer ones
    assert len(set(app.head_colors(25))) == 25  # GPT-2 XL's 25 heads
