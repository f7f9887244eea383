"""The launched app driven through ``gradio_client``, as a script would use it: every action is a
named endpoint; the session keeps its pruned models between calls."""

import json
import zipfile

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from clover_core.audio import bundled_clips
from tests.conftest import launched_app

pytestmark = [pytest.mark.server, pytest.mark.slow]

LM = "gpt2-tiny-random"
SETTING = (LM, 0.5, "qk", "uniform")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with launched_app(tmp_path_factory.mktemp("scratch")) as url:
        yield Client(url, verbose=False)


def kept_ranks(plot: dict) -> list:
    """The "rank kept" of every head, from the heatmap's hover data in the plot's JSON."""
    figure = json.loads(plot["plot"])
    return [
        [cell[0] for row in trace["customdata"] for cell in row]
        for trace in figure["data"]
        if trace["type"] == "heatmap"
    ]


def test_every_action_is_a_named_endpoint(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(named) == {
        "/load_model",
        "/spectra",
        "/prune",
        "/compare_text",
        "/compare_audio",
        "/compare_images",
        "/download",
    }
    parameters = named["/prune"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == ["model", "ratio", "target", "mode", "scores"]
    assert parameters[-1]["parameter_has_default"] and parameters[-1]["parameter_default"] == "data-free"  # optional


def test_load_spectra_and_slider(client):
    status, target, layer = client.predict(LM, api_name="/load_model")
    assert status.startswith(f"**{LM}**") and layer["value"] == "transformer.h.0.attn"
    ranks = {}
    for ratio in (0.25, 0.75):
        heatmap, curves, text = client.predict(LM, ratio, "qk", "uniform", "transformer.h.2.attn", api_name="/spectra")
        ranks[ratio] = kept_ranks(heatmap)
        assert "of transformer.h.2.attn" in curves["plot"]
    assert set(ranks[0.25][0]) == {48} and set(ranks[0.75][0]) == {16}  # Q-K follows the ratio
    assert ranks[0.25][1] == ranks[0.75][1]  # V-O is not the target
    results = client.predict(LM, 0.75, "qk", "uniform", api_name="/prune")
    assert "ratio 0.75" in results and "CLOVER**-pruned" in results and "(-37.5%)" in results  # 3/4 of K


def test_compare_text_and_download(client, tmp_path):
    original, vanilla, clover = client.predict(*SETTING, "Once upon a time", 5, api_name="/compare_text")
    assert all(isinstance(t, str) and t for t in (original, vanilla, clover))
    path = client.predict(*SETTING, api_name="/download")
    assert path.endswith(f"{LM}-clover-qk-uniform-0.5.zip")
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read(f"{LM}-clover-qk-uniform-0.5/config.json"))
    assert config["clover"]["method"] == "clover" and config["clover"]["ratio"] == 0.5


def test_errors_reach_the_caller(client):
    with pytest.raises(AppError, match="greater than maximum value 0.9"):  # the slider's own bounds
        client.predict(LM, 0.99, "qk", "uniform", None, api_name="/spectra")
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict(*SETTING, " ", 5, api_name="/compare_text")
    status, *_ = client.predict("/etc", api_name="/load_model")
    assert status.startswith("**Cannot load `/etc`**")


def test_upload_a_wav_file(client):
    status, *_ = client.predict("whisper-tiny.en", api_name="/load_model")
    assert "speech model" in status
    wav = bundled_clips()["hello_world"][0]
    original, vanilla, clover, note = client.predict(
        "whisper-tiny.en", 0.0, "vo", "uniform", None, handle_file(str(wav)), api_name="/compare_audio"
    )
    assert original.lower().startswith("hello") and vanilla == clover == original and note == ""


def test_the_api_defaults_work(client):
    """Arguments left out take the page's defaults, and those fit the default model (rotary SmolLM2: V-O);
    a spectrum needs no layer (the first), and a bundled clip needs no upload."""
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert all(p["parameter_has_default"] for p in named["/prune"]["parameters"])
    assert client.predict(api_name="/prune").startswith("**smollm2-135m**: V-O pruned, uniform, ratio 0.25")
    _, curves, _ = client.predict(LM, 0.5, "qk", "uniform", api_name="/spectra")
    assert "of transformer.h.0.attn" in curves["plot"]
    original, vanilla, clover, note = client.predict(
        "whisper-tiny.en", 0.0, "vo", "uniform", "hello_world", api_name="/compare_audio"
    )
    assert original.lower().startswith("hello") and vanilla == clover == original and "Word error rate" in note
