"""A public app meets strangers: bad input gets a clear message (command line, API and page), untrusted
files are never unpickled or executed, a save killed half-way or a full disk never leaves a
half-written checkpoint, a model that fails to load leaves the app usable, sessions do not see each
other, and a full queue turns new requests away with a busy message."""

import ast
import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from gradio_client import Client, handle_file

import app
import clover_core as cc
from clover_core.__main__ import main
from clover_core.io import weights
from studio import cache as model_cache
from studio import downloads, outputs
from studio import session as pruning

from .conftest import launched_app
from .tolerances import FP32

ROOT = Path(__file__).resolve().parent.parent
LM = "gpt2-tiny-random"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def call(fn, *args, **kwargs):
    """A handler as the page calls it: user errors become ``gr.Error``."""
    return app.user_errors(fn)(*args, **kwargs)


def cli_error(err: str) -> str:
    """The command line's one error line (progress bars may precede it on stderr); never a traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def logits(model, seed: int = 1):
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def tiny_studio(tmp_path, **loaders) -> app.Studio:
    return app.Studio(model_cache.ModelCache(2**30, loaders=loaders), downloads.ScratchFolder(tmp_path / "scratch"))


def tone(path, seconds=1.0, sr=16000, channels=1, amplitude=0.3):
    t = np.arange(int(seconds * sr)) / sr
    mono = amplitude * np.sin(2 * np.pi * 440 * t)
    sf.write(path, np.stack([mono] * channels, axis=1) if channels > 1 else mono, sr)
    return path


# --------------------------------------------------------------------------- bad input catalogue


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), -0.1, None, 0.95])
def test_app_ratio_out_of_range_or_nan_is_named(make_gpt2, tmp_path, ratio):
    studio = tiny_studio(tmp_path, tiny=lambda: (make_gpt2(), None))
    with pytest.raises(gr.Error, match=r"ratio=.* is outside this app's range 0\.\.0\.9"):
        call(studio.spectra, "tiny", ratio, "qk", "uniform", None)
    with pytest.raises(gr.Error, match="outside this app's range"):
        call(studio.download, "tiny", ratio, "qk", "uniform", None)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--mode", "threshold", "--threshold", "nan"], "threshold=nan is not valid"),
        (["--mode", "threshold", "--threshold", "-1"], "threshold=-1.0"),
        (["--ratio", "inf"], "ratio=inf is not valid"),
        (["--ratio", "-0.5"], "ratio=-0.5"),
    ],
)
def test_cli_thresholds_and_ratios_out_of_range(tmp_path, capsys, args, match):
    assert main(["prune", "--model", "no-model-is-loaded-first", "--out", str(tmp_path / "x"), *args]) == 2
    assert match in cli_error(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_api_unknown_model_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model='no-such-model' is not in the local .* Offline models: gpt2-tiny"):
        cc.load_model("no-such-model")
    with pytest.raises(ValueError, match="is not a model name"):
        cc.load_model("  ")


def test_a_diffusion_model_in_the_language_tab_says_which_tab(make_unet, tmp_path, capsys):
    unet = make_unet()
    pipe = SimpleNamespace(unet=unet, to=lambda device: pipe, components={"unet": unet})
    studio = tiny_studio(tmp_path, **{"someone/sdxl-like": lambda: (unet, pipe)})
    with pytest.raises(gr.Error, match="someone/sdxl-like is an image model; this comparison is for language"):
        call(studio.compare_text, "someone/sdxl-like", 0.25, "qk", "uniform", "The city", 4, None)
    with pytest.raises(gr.Error, match="is an image model; this comparison is for speech"):
        call(
            studio.compare_audio, "someone/sdxl-like", 0.25, "qk", "uniform", None, str(tone(tmp_path / "a.wav")), None
        )
    assert main(["demo", "--model", "sdxl-tiny-random", "--tokens", "50"]) == 2  # the CLI's language-model demo
    assert "is a diffusion model; demo scores WikiText-2 perplexity" in cli_error(capsys.readouterr().err)


def test_a_model_without_supported_attention(tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    studio = tiny_studio(tmp_path, mlp=lambda: (torch.nn.Sequential(torch.nn.Linear(4, 4)), None))
    status, *_, text_panel, audio_panel, image_panel = studio.load_model("mlp")
    assert status.startswith("**Cannot load `mlp`**") and "has no supported attention module" in status
    assert not any(p["visible"] for p in (text_panel, audio_panel, image_panel))
    folder = tmp_path / "opt"
    OPTForCausalLM(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    ).save_pretrained(folder)
    assert main(["prune", "--model", str(folder), "--ratio", "0.5", "--out", str(tmp_path / "out")]) == 2
    err = cli_error(capsys.readouterr().err)
    assert "OPTForCausalLM has no supported attention module; supported classes: GPT2Attention" in err
    assert not (tmp_path / "out").exists()


def test_empty_image_prompt_and_steps():
    with pytest.raises(ValueError, match="prompt is empty; describe the image"):
        outputs.make_image(None, None, "   ", 0, 3)
    with pytest.raises(ValueError, match="steps=0 must be between 1 and 50"):
        outputs.make_image(None, None, "a barn", 0, 0)


def test_audio_that_is_not_audio_names_the_file_not_the_server_folder(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match=r"^junk\.wav is not an audio file .*use WAV, FLAC, OGG or MP3") as e:
        outputs.read_audio(junk)
    assert str(tmp_path) not in str(e.value)


def test_silent_audio_is_refused_before_any_model_runs(tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    studio = tiny_studio(tmp_path)  # no model: the audio is checked first
    with pytest.raises(gr.Error, match=r"silent\.wav is silent .*record again"):
        call(studio.compare_audio, "whisper-tiny.en", 0.0, "qk", "uniform", None, str(silent), None)
    assert studio.cache.names() == []


def test_audio_size_cap_and_wrong_rate_or_stereo(tmp_path, monkeypatch):
    stereo = tone(tmp_path / "stereo.wav", seconds=1.5, sr=44100, channels=2)
    assert app.launch_options()["max_file_size"] == "10mb"  # the server refuses larger uploads (tested below)
    samples = outputs.read_audio(stereo)  # stereo 44.1 kHz -> mono 16 kHz
    assert samples.dtype == np.float32 and samples.shape == (24000,) and np.abs(samples).max() > 0.25
    monkeypatch.setattr(outputs, "MAX_AUDIO_BYTES", stereo.stat().st_size - 1)
    with pytest.raises(ValueError, match=r"stereo\.wav is 0\.\d MB, over the cap of .* MB"):
        outputs.read_audio(stereo)


def _checkpoint_with(saved: Path, **changes) -> Path:
    config = json.loads((saved / "config.json").read_text())
    config.update(changes)
    (saved / "config.json").write_text(json.dumps(config))
    return saved


@pytest.fixture
def saved(make_gpt2, tmp_path):
    return cc.save_pruned(cc.prune(make_gpt2("3x16"), ratio=0.5, target="both"), tmp_path / "ckpt")


def _ranks(saved: Path, module_ranks) -> dict:
    clover = json.loads((saved / "config.json").read_text())["clover"]
    return dict(clover, ranks={"transformer.h.0.attn": module_ranks})


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda s: {"architectures": ["LlamaForCausalLM"]},
            "names architecture LlamaForCausalLM but model_type 'gpt2'",
        ),
        (
            lambda s: {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"},
            "lists ranks for 'transformer.h.0.attn', which the model does not have",
        ),
        (lambda s: {"architectures": ["os.system"]}, "names architecture 'os.system', which transformers does not"),
        (lambda s: {"n_embd": 50}, "does not describe a valid GPT2LMHeadModel"),
        (lambda s: {"clover": _ranks(s, {"qk": [4, 4, 4]})}, r"name pairs \['qk'\], but the module has \['qk', 'vo'\]"),
        (lambda s: {"clover": _ranks(s, {"qk": [99, 99, 99], "vo": [16] * 3})}, r"expected 3 integers in 0\.\.16"),
        (lambda s: {"clover": _ranks(s, {"qk": "8", "vo": [16] * 3})}, r"\(qk\) are '8'"),
        (
            lambda s: {"clover": dict(json.loads((s / "config.json").read_text())["clover"], ranks=[1])},
            "clover.ranks is a list",
        ),
        (
            lambda s: {"n_positions": 32},
            r"transformer\.wpe\.weight has shape \(64, 48\) but the config implies \(32, 48\)",
        ),
    ],
)
def test_checkpoint_from_another_architecture_or_tampered_is_named(saved, capsys, change, match):
    _checkpoint_with(saved, **change(saved))
    with pytest.raises(ValueError, match=match):
        cc.load_pruned(saved)
    assert main(["spectra", "--model", str(saved), "--out", str(saved.parent / "s.json")]) == 2
    assert str(saved) in cli_error(capsys.readouterr().err)  # the folder is named


# --------------------------------------------------------------------------- untrusted files


def _sources() -> list[Path]:
    return sorted((ROOT / "clover_core").rglob("*.py")) + [ROOT / "app.py"]


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_the_package_never_unpickles():
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(
                    (n or "").split(".")[0]
                    in {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
                    for n in names
                ):
                    offenders.append(f"{path.name}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call):
                name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
                if name == "torch.load" or name.endswith(".torch.load"):
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                if name in {"np.load", "numpy.load"} and not (
                    isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                ):
                    offenders.append(f"{path.name}:{node.lineno} np.load without allow_pickle=False")
                if (
                    name.endswith("from_pretrained")
                    and "use_safetensors" in kw
                    and not (isinstance(kw["use_safetensors"], ast.Constant) and kw["use_safetensors"].value is True)
                ):
                    offenders.append(f"{path.name}:{node.lineno} use_safetensors is not True")
    assert offenders == []
    assert len(_sources()) > 20  # the scan really saw the package


def test_no_code_path_trusts_remote_code():
    trusted = [
        f"{p.name}:{c.lineno}"
        for p in _sources()
        for c in _calls(p)
        for k in c.keywords
        if k.arg in {"trust_remote_code", "custom_pipeline"}
        and not (isinstance(k.value, ast.Constant) and k.value.value in (False, None))
    ]
    assert trusted == []


def test_a_user_supplied_hub_id_is_loaded_without_remote_code_and_without_pickles(monkeypatch, make_unet):
    """What the app does with a typed hub id, recorded at the transformers / diffusers boundary."""
    import diffusers
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from clover_core import models

    seen = []

    def recorder(result):
        class Fake:
            @classmethod
            def from_pretrained(cls, name, **kwargs):
                seen.append((cls.__name__, name, kwargs))
                if isinstance(result, Exception):
                    raise result
                return result

        return Fake

    config = GPT2Config(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers, "AutoConfig", recorder(config))
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", recorder(GPT2LMHeadModel(config)))
    monkeypatch.setattr(transformers, "AutoProcessor", recorder(OSError("none")))
    monkeypatch.setattr(transformers, "AutoTokenizer", recorder(OSError("none")))
    model_cache.ModelCache(2**30).get("stranger/evil-model")
    pipe = SimpleNamespace(unet=make_unet())
    monkeypatch.setattr(models, "_is_diffusion_repo", lambda name, local_only: True)
    monkeypatch.setattr(diffusers, "DiffusionPipeline", recorder(pipe))
    assert models.load_model("stranger/evil-pipeline").model.config._name_or_path == "stranger/evil-pipeline"
    assert {name for _, name, _ in seen} == {"stranger/evil-model", "stranger/evil-pipeline"}
    for cls, name, kwargs in seen:
        assert not kwargs.get("trust_remote_code") and "custom_pipeline" not in kwargs, (cls, kwargs)
    weights = [kwargs for _, _, kwargs in seen if "use_safetensors" in kwargs]
    assert len(weights) == 2 and all(k["use_safetensors"] is True for k in weights)  # the model and the pipeline


def test_scratch_names_stay_inside_the_folder_and_sweeps_never_follow_links(make_gpt2, tmp_path):
    for name in ("../../escape", "owner/..", "/abs/path/model", "..\\..\\win"):
        loaded = model_cache.ModelCache(2**30, loaders={name: lambda: (make_gpt2(), None)}).get(name)
        pair = pruning.pruned_pair(loaded, pruning.Setting(name, 0.5, "qk", "uniform"))
        folder = tmp_path / "scratch" / "one"
        folder.mkdir(parents=True, exist_ok=True)
        archive = downloads.export_checkpoint(pair, folder)
        assert archive.parent == folder and archive.is_file()
        with zipfile.ZipFile(archive) as zf:
            assert all(".." not in Path(n).parts and not n.startswith("/") for n in zf.namelist())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    scratch = downloads.ScratchFolder(tmp_path / "swept", max_age_s=60)
    link = scratch.root / "link"
    link.symlink_to(outside, target_is_directory=True)
    os.utime(link, (time.time() - 3600,) * 2, follow_symlinks=False)
    assert scratch.sweep() == 1 and not link.exists() and (outside / "precious.txt").read_text() == "keep"


# --------------------------------------------------------------------------- faults while saving

CHILD = """
import sys, time, torch
import transformers.modeling_utils as mu
import clover_core as cc
from transformers import GPT2Config, GPT2LMHeadModel

def slow_write(state, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\0" * 1000)
        f.flush()
        print("WRITING", flush=True)
        time.sleep(300)

mu.safe_save_file = slow_write
torch.manual_seed(1)
model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=3, n_embd=48)).eval()
cc.save_pruned(cc.prune(model, ratio=0.25), sys.argv[1])
"""


def kill_while_writing(child: str, *args: Path) -> int:
    """Run the script ``child`` with ``args``, SIGKILL it (no cleanup runs) once it prints that it is
    writing, and return its process id."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", child, *map(str, args)], stdout=subprocess.PIPE, env=env, text=True)
    timer = threading.Timer(180, proc.kill)
    timer.start()
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.kill()
        assert proc.wait() == -9
    finally:
        timer.cancel()
        proc.stdout.close()
    return proc.pid


@pytest.mark.slow
def test_a_save_killed_mid_write_leaves_the_old_checkpoint(make_gpt2, tmp_path):
    old = cc.prune(make_gpt2("3x16"), ratio=0.5, target="both")
    out = cc.save_pruned(old, tmp_path / "ckpt")
    kill_while_writing(CHILD, out)  # the child is inside the weights file
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").stat().st_size == 1000  # half-written
    torch.testing.assert_close(logits(cc.load_pruned(out)), logits(old), **FP32)  # the old one, intact
    assert weights.is_checkpoint(out) and sorted(p.name for p in tmp_path.iterdir()) == [leftovers[0].name, "ckpt"]
    new = cc.prune(make_gpt2("3x16", seed=2), ratio=0.25)
    cc.save_pruned(new, out)  # the next save works, and sweeps the dead save's folder
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    torch.testing.assert_close(logits(cc.load_pruned(out)), logits(new), **FP32)


STREAM_CHILD = """
import sys
import time

import clover_core.__main__ as cli
from clover_core.io import safetensors_files

real_add = safetensors_files.ShardWriter.add


def slow_add(writer, tensors):
    real_add(writer, tensors)
    writer.file.flush()
    print("WRITING", flush=True)
    time.sleep(300)


safetensors_files.ShardWriter.add = slow_add
sys.exit(cli.main(["prune", "--model", sys.argv[1], "--ratio", "0.25", "--out", sys.argv[2]]))
"""


@pytest.mark.slow
def test_a_killed_streaming_prune_leaves_nothing_the_next_save_does_not_sweep(make_gpt2, tmp_path):
    source = tmp_path / "source"
    make_gpt2("3x16").save_pretrained(source)  # a safetensors folder: the command line streams it
    out = tmp_path / "ckpt"
    pid = kill_while_writing(STREAM_CHILD, source, out)  # the child is writing its first shard
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".ckpt.{pid}.")  # named after the dead process
    assert main(["prune", "--model", str(source), "--ratio", "0.5", "--out", str(out)]) == 0  # streamed again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "source"]  # the dead prune's folder is gone
    assert weights.is_checkpoint(out)


def fill_disk(monkeypatch) -> None:
    """From now on every safetensors write gets half-way and then finds the disk full: transformers'
    (``save_pruned``) and the streaming prune's shard writer (the command line)."""
    import transformers.modeling_utils as mu

    from clover_core.io import safetensors_files

    def write_half(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise ENOSPC

    def add_half(writer, tensors):
        if writer.file is None:
            writer._start()
        writer.file.write(b"\0" * 100)
        raise ENOSPC

    monkeypatch.setattr(mu, "safe_save_file", write_half)
    monkeypatch.setattr(safetensors_files.ShardWriter, "add", add_half)


def test_a_full_disk_keeps_the_old_checkpoint_everywhere(make_gpt2, tmp_path, monkeypatch, capsys):
    old = cc.prune(make_gpt2("3x16"), ratio=0.5, target="both")
    out = cc.save_pruned(old, tmp_path / "ckpt")
    source = tmp_path / "source"
    make_gpt2("3x16", seed=3).save_pretrained(source)
    fill_disk(monkeypatch)
    with pytest.raises(OSError) as e:  # the API
        cc.save_pruned(cc.prune(make_gpt2("3x16", seed=2), ratio=0.25), out)
    assert e.value.errno == errno.ENOSPC
    assert main(["prune", "--model", str(source), "--ratio", "0.5", "--out", str(out)]) == 2  # the command line
    assert "No space left on device" in cli_error(capsys.readouterr().err)
    studio = tiny_studio(tmp_path, tiny=lambda: (make_gpt2(), None))  # the page
    with pytest.raises(gr.Error, match="No space left on device"):
        call(studio.download, "tiny", 0.5, "qk", "uniform", None)
    torch.testing.assert_close(logits(cc.load_pruned(out)), logits(old), **FP32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "scratch", "source"]  # no temporary folders


def test_an_old_checkpoint_renamed_aside_by_a_killed_save_is_put_back(make_gpt2, tmp_path, monkeypatch):
    """Where the folder cannot be swapped atomically, the old one is renamed aside first; a save killed
    right then leaves it there, and the next save puts it back before anything else."""
    old = cc.prune(make_gpt2("3x16"), ratio=0.5, target="both")
    out = cc.save_pruned(old, tmp_path / "ckpt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".ckpt.old-{dead.pid}"
    os.replace(out, aside)  # the state a save killed between its two renames leaves
    fill_disk(monkeypatch)
    with pytest.raises(OSError):
        cc.save_pruned(cc.prune(make_gpt2("3x16", seed=2), ratio=0.25), out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    torch.testing.assert_close(logits(cc.load_pruned(out)), logits(old), **FP32)


# --------------------------------------------------------------------------- the launched app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on loopback with a queue of one, the upload cap, and two extra models: one that fails to
    load, one whose load waits for a signal (to hold the single worker busy)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gate = SimpleNamespace(entered=threading.Event(), release=threading.Event())

    def broken():
        raise RuntimeError("CUDA out of memory while loading (simulated)")

    def slow():
        gate.entered.set()
        assert gate.release.wait(120)
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=16)), None

    cache = model_cache.ModelCache(8 * 2**30, loaders={"broken/model": broken, "slow/model": slow})
    with launched_app(
        tmp_path_factory.mktemp("scratch"), cache=cache, launch=app.launch_options(), CLOVER_QUEUE_SIZE="1"
    ) as url:
        yield SimpleNamespace(url=url, cache=cache, gate=gate)


@pytest.mark.server
def test_a_failed_load_leaves_the_session_usable(served):
    client = Client(served.url, verbose=False)
    status, *_ = client.predict("broken/model", api_name="/load_model")
    assert status == "**Cannot load `broken/model`**: CUDA out of memory while loading (simulated)"
    status, target, layer = client.predict(LM, api_name="/load_model")  # the same session, next request
    assert status.startswith(f"**{LM}**") and layer["value"] == "transformer.h.0.attn"
    heatmap, _, ranks = client.predict(LM, 0.5, "qk", "uniform", None, api_name="/spectra")
    assert "512 of 1,024" in ranks
    assert "broken/model" not in served.cache.names() and served.cache._loading == {}


@pytest.mark.server
@pytest.mark.slow
def test_two_sessions_with_different_settings_do_not_see_each_other(served):
    loaded = served.cache.get(LM)
    before = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in loaded.model.parameters())).hexdigest()
    prompt, settings = "The history of", {"a": 0.25, "b": 0.75}
    reference = {}
    for user, ratio in settings.items():  # single-user results, computed in this process
        pair = pruning.pruned_pair(loaded, pruning.Setting(LM, ratio, "both", "uniform"))
        reference[user] = outputs.complete_text(pair.clover, loaded.processor, prompt, 8)
    assert reference["a"] != reference["b"]  # otherwise cross-talk could not show
    clients = {user: Client(served.url, verbose=False) for user in settings}
    for _ in range(2):
        for user, ratio in settings.items():
            *_, clover = clients[user].predict(LM, ratio, "both", "uniform", prompt, 8, api_name="/compare_text")
            assert clover == reference[user], user
    after = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in loaded.model.parameters())).hexdigest()
    assert after == before  # the shared model is only read


@pytest.mark.server
def test_a_full_queue_turns_new_requests_away_with_a_busy_message(served):
    from gradio_client.utils import Status

    users = [Client(served.url, verbose=False) for _ in range(3)]
    running = users[0].submit("slow/model", api_name="/load_model")
    assert served.gate.entered.wait(60)  # the single worker is busy
    waiting = users[1].submit(LM, api_name="/load_model")
    deadline = time.time() + 30
    while waiting.status().code != Status.IN_QUEUE and time.time() < deadline:
        time.sleep(0.1)
    assert waiting.status().code == Status.IN_QUEUE  # the queue (size 1) is now full
    try:
        with pytest.raises(Exception, match="Queue is full"):
            users[2].predict(LM, api_name="/load_model")
        response = httpx.post(
            f"{served.url}gradio_api/queue/join",
            json={"data": [LM], "fn_index": 0, "session_hash": "stranger", "event_data": None, "trigger_id": None},
        )
        assert response.status_code == 503 and "Queue is full. Max size is 1" in response.json()["detail"]
    finally:
        served.gate.release.set()
    assert running.result(timeout=120)[0].startswith("**slow/model**")
    assert waiting.result(timeout=120)[0].startswith(f"**{LM}**")
    assert users[2].predict(LM, api_name="/load_model")[0].startswith(f"**{LM}**")  # served again once free


@pytest.mark.server
def test_uploads_over_the_cap_and_odd_files_are_refused(served, tmp_path):
    client = Client(served.url, verbose=False)
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (outputs.MAX_AUDIO_BYTES + 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):  # the client checks
        client.predict("whisper-tiny.en", 0.0, "vo", "uniform", None, handle_file(str(big)), api_name="/compare_audio")
    with big.open("rb") as f:  # and so does the server, for callers that do not
        response = httpx.post(f"{served.url}gradio_api/upload", files={"files": ("big.wav", f)}, timeout=60)
    assert response.status_code == 413 and "10" in response.text, response.text
    junk = tmp_path / "notes.txt"
    junk.write_text("these bytes are not audio\n" * 50)
    with pytest.raises(Exception, match=r"notes\.txt is not an audio file") as e:
        client.predict("whisper-tiny.en", 0.0, "vo", "uniform", None, handle_file(str(junk)), api_name="/compare_audio")
    assert "/tmp" not in str(e.value) and "gradio" not in str(e.value)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "..%2f..%2f..%2fetc%2fpasswd",
        "{scratch}/../../../etc/passwd",
        str(ROOT / "app.py"),
    ],
)
@pytest.mark.server
def test_downloads_are_served_only_from_the_app_folders(served, path):
    import tempfile

    response = httpx.get(f"{served.url}gradio_api/file={path.format(scratch=tempfile.gettempdir())}")
    assert response.status_code in (403, 404)
    assert "root:" not in response.text and "import gradio" not in response.text
