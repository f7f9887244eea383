import json

import pytest
import torch

import clover_core as cc
from clover_core.__main__ import main


@pytest.fixture
def model_dir(make_gpt2, tmp_path):
    path = tmp_path / "tiny"
    make_gpt2("5x8").save_pretrained(path)
    return path


def test_prune_writes_a_loadable_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_dir),
                "--target",
                "qk",
                "--method",
                "clover",
                "--mode",
                "global",
                "--ratio",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pruned = cc.load_pruned(out)
    assert pruned.config.clover["mode"] == "global"
    assert sum(8 - r for d in pruned.config.clover["ranks"].values() for r in d["qk"]) == round(0.5 * 3 * 5 * 8)
    assert "saved to" in capsys.readouterr().out


def test_spectra_json(model_dir, tmp_path):
    out = tmp_path / "spectra.json"
    assert main(["spectra", "--model", str(model_dir), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    model = cc.load_model(str(model_dir)).model
    expected = cc.spectra(model)
    assert set(data) == set(expected)
    torch.testing.assert_close(torch.tensor(data["transformer.h.2.attn"]["vo"]), expected["transformer.h.2.attn"]["vo"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--ratio", "1.5"], "ratio=1.5 is out of range"),
        (["--ratio", "nan"], "ratio=nan"),
        (["--mode", "threshold"], "threshold=None"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(model_dir, tmp_path, capsys, args, match):
    status = main(["prune", "--model", str(model_dir), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_model_names_the_offline_models(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["spectra", "--model", "no-such-org/no-such-model", "--out", "x.json"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "gpt2-tiny-random" in err


def test_invalid_choice_is_rejected_by_the_parser(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", str(model_dir), "--target", "kq", "--out", "x"])
    assert e.value.code == 2
    assert "invalid choice: 'kq'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_compares_original_vanilla_and_clover(capsys):
    assert main(["demo", "--model", "gpt2-tiny-random", "--ratio", "0.5", "--tokens", "300"]) == 0
    out = capsys.readouterr().out
    for label in ("original", "vanilla", "clover"):
        assert f"{label}:" in out
    assert "perplexity" in out


@pytest.mark.real_weights
@pytest.mark.slow
def test_demo_fits_its_windows_to_the_model(capsys):
    """gpt2-shakespeare has 256 positions: the demo's 512-token windows shrink to them."""
    assert main(["demo", "--model", "gpt2-shakespeare", "--ratio", "0.5", "--tokens", "600"]) == 0
    out = capsys.readouterr().out
    assert "(windows of 256, stride 128)" in out
    assert all(f"{label}:" in out for label in ("original", "vanilla", "clover"))


def test_prune_calibrated_on_a_text_records_which_text(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("Calibration data is never the text a figure is measured on. " * 30, encoding="utf-8")
    for calibration, name in (("default", "paradise_lost.txt (bundled), 256 tokens"), (str(text), "notes.txt, 256")):
        out = tmp_path / f"pruned-{len(name)}"
        args = ["prune", "--model", "gpt2-tiny-random", "--target", "vo", "--ratio", "0.5", "--out", str(out)]
        assert main([*args, "--calibration", calibration, "--calibration-tokens", "256"]) == 0
        record = cc.load_pruned(out).config.clover["calibration"]
        assert record["data"].startswith(name) and record["statistic"] == "input covariance"
        assert "calibrating on" in capsys.readouterr().out


@pytest.mark.parametrize(
    "calibration,tokens,match",
    [
        ("missing.txt", "4096", "--calibration 'missing.txt' does not exist"),
        ("default", "3", "--calibration-tokens=3 must be at least 16"),
    ],
)
def test_bad_calibration_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, calibration, tokens, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("clover_core.__main__.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = ["prune", "--model", "gpt2-tiny-random", "--ratio", "0.5", "--out", str(tmp_path / "o")]
    assert main([*args, "--calibration", calibration, "--calibration-tokens", tokens]) == 2
    assert match in capsys.readouterr().err


def test_calibration_data_of_the_wrong_kind_is_named(tmp_path, capsys):
    (tmp_path / "clip.wav").write_bytes(b"RIFF\xff\xfe\x00junk")
    args = ["prune", "--model", "gpt2-tiny-random", "--ratio", "0.5", "--out", str(tmp_path / "o")]
    assert main([*args, "--calibration", str(tmp_path / "clip.wav")]) == 2  # audio for a language model
    assert "clip.wav is not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibrating_a_folder_without_a_tokenizer_says_what_to_do(model_dir, tmp_path, capsys):
    args = [
        "prune",
        "--model",
        str(model_dir),
        "--ratio",
        "0.5",
        "--calibration",
        "default",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "this model has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prune_with_folded_norms_needs_no_data(model_dir, tmp_path, capsys):
    out = tmp_path / "folded"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_dir),
                "--target",
                "vo",
                "--ratio",
                "0.5",
                "--calibration",
                "norms",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert cc.load_pruned(out).config.clover["calibration"]["statistic"] == "norm gains"
    assert "no data" in capsys.readouterr().out


def test_prune_with_normalized_allocation_streams_and_records_it(model_dir, tmp_path):
    out = tmp_path / "normalized"
    args = ["prune", "--model", str(model_dir), "--mode", "global", "--ratio", "0.5", "--out", str(out)]
    assert main([*args, "--allocation", "normalized"]) == 0  # a safetensors folder: streamed
    assert cc.load_pruned(out).config.clover["allocation"] == "normalized"
    model = cc.load_model(str(model_dir)).model
    expected = cc.prune(model, ratio=0.5, mode="global", allocation="normalized").config.clover["ranks"]
    assert cc.load_pruned(out).config.clover["ranks"] == expected  # the streamed plan is the in-memory one
