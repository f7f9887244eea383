"""Whisper: word error rate and teacher-forced loss against the pruning ratio, CLOVER vs vanilla, on
the bundled English clips, for Q-K and V-O of every attention module (encoder, decoder, cross).

    python demos/fig_whisper.py                          # whisper-tiny.en and whisper-base, CPU
    python demos/fig_whisper.py --models openai/whisper-large-v3 --device cuda --max-clips 3

Greedy decoding. The loss is the mean cross-entropy of the reference transcript's tokens (and the
end-of-text token) given the audio and the model's usual prompt.
"""

from __future__ import annotations

import argparse

import torch
from sweep import cc, pick_device, ratio_figure, sweep, write

from clover_core.audio import bundled_clips, load_audio, transcribe
from clover_core.metrics import teacher_forced_loss, word_error_rate


def prompt_ids(model, tokenizer) -> list[int]:
    """The decoder prompt: start of transcript, (language, task,) no timestamps."""
    names = ["<|startoftranscript|>"]
    if model.config.vocab_size >= 51865:  # multilingual
        names += ["<|en|>", "<|transcribe|>"]
    names.append("<|notimestamps|>")
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def reference_tensors(model, processor, clips):
    """Per clip: log-mel features, decoder inputs and aligned labels (-100 on the prompt)."""
    tok = processor.tokenizer
    prompt, eot = prompt_ids(model, tok), tok.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for path, text in clips.values():
        feats = processor(load_audio(path), sampling_rate=16000, return_tensors="pt").input_features
        words = tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([prompt + words])
        labels = torch.tensor([[-100] * (len(prompt) - 1) + words + [eot]])
        out.append((feats, inputs, labels))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="whisper-tiny.en,whisper-base")
    p.add_argument("--max-clips", dest="max_clips", type=int, default=None, help="use only the first N clips")
    p.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625,0.75")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    clips = dict(list(bundled_clips().items())[: args.max_clips])
    rows = []
    for name in args.models.split(","):
        bundle = cc.load_model(name)
        model, processor = bundle.model.to(device), bundle.processor
        refs = reference_tensors(model, processor, clips)
        lang = {"language": "en", "task": "transcribe"} if model.config.vocab_size >= 51865 else {}

        def evaluate(m, processor=processor, refs=refs, lang=lang):
            hyps = [transcribe(m, processor, path, **lang) for path, _ in clips.values()]
            loss = sum(teacher_forced_loss(m, f, y, decoder_input_ids=x) for f, x, y in refs) / len(refs)
            return {"wer": word_error_rate([t for _, t in clips.values()], hyps), "loss": loss, "transcript_0": hyps[0]}

        dec = cc.decompose(model, progress=True)
        rows += sweep(
            dec, evaluate, ratios=[float(r) for r in args.ratios.split(",")], targets=["qk", "vo"], label=name
        )
    for name in args.models.split(","):
        mine = [r for r in rows if r["model"] == name]
        fig = ratio_figure(
            mine,
            [("wer", "word error rate"), ("loss", "teacher-forced loss (nats/token)")],
            f"{name}: WER and loss on {len(clips)} clips vs global pruning ratio",
            log_y=False,
        )
        meta = {
            "model": name,
            "device": str(device),
            "clips": {k: t for k, (_, t) in clips.items()},
            "decoding": "greedy",
            "command": f"python demos/fig_whisper.py --models {name}",
        }
        write(f"whisper_{name.split('/')[-1]}", mine, fig, meta)


if __name__ == "__main__":
    main()
