"""Loads pruned folders the way a user without CLOVER Studio does, and runs the same checks as the parent.

``tests/test_remote_code.py`` imports the output functions below for its in-memory reference, and runs
a COPY of this file in a fresh, isolated Python (``-I``) from a folder outside the project; there any
import of ``clover_core`` fails, so the folders must load with transformers / diffusers alone.

Usage: ``python remote_child.py JOBS.json REPORT.json``; each job names the family, the folder, the
inputs (safetensors) and where to write the outputs (safetensors).
"""

import importlib
import importlib.abc
import json
import sys
import traceback

import torch

LOADERS = {  # family -> (library, auto class)
    "gpt2": ("transformers", "AutoModelForCausalLM"),
    "llama": ("transformers", "AutoModelForCausalLM"),
    "whisper": ("transformers", "AutoModelForSpeechSeq2Seq"),
    "unet": ("diffusers", "AutoModel"),
}
PLAIN = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "whisper": "WhisperForConditionalGeneration",
    "unet": "UNet2DConditionModel",
}


@torch.no_grad()
def lm_forward(model, x: dict) -> dict:
    return {"logits": model(x["ids"]).logits}


@torch.no_grad()
def lm_generate(model, x: dict) -> dict:
    """A greedy generation, which runs through the (pruned) KV cache."""
    prompt = x["ids"][:1, :4]
    return {
        "generated": model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    }


@torch.no_grad()
def whisper_forward(model, x: dict) -> dict:
    return {"logits": model(input_features=x["features"], decoder_input_ids=x["dec_ids"]).logits}


@torch.no_grad()
def whisper_generate(model, x: dict) -> dict:
    """A greedy generation through the self- and cross-attention caches."""
    return {
        "generated": model.generate(
            x["features"], max_new_tokens=6, do_sample=False, decoder_input_ids=x["dec_ids"][:, :1]
        )
    }


@torch.no_grad()
def unet_forward(model, x: dict) -> dict:
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    return {"sample": model(x["latents"], x["timestep"], x["states"], added_cond_kwargs=added).sample}


@torch.no_grad()
def sdxl_pipeline(model, x: dict) -> dict:
    """Two denoising steps of an SDXL pipeline (classifier-free guidance) built around the UNet from text
    embeddings: no text encoders or VAE needed, latents out."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=model,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    latents = pipe(
        prompt_embeds=x["states"],
        pooled_prompt_embeds=x["text_embeds"],
        negative_prompt_embeds=-x["states"],
        negative_pooled_prompt_embeds=-x["text_embeds"],
        num_inference_steps=2,
        height=128,
        width=128,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    return {"pipeline": latents}


CHECKS = {  # family -> (one forward pass, what else must match)
    "gpt2": (lm_forward, lm_generate),
    "llama": (lm_forward, lm_generate),
    "whisper": (whisper_forward, whisper_generate),
    "unet": (unet_forward, sdxl_pipeline),
}


def outputs(family: str, model, x: dict) -> dict:
    """Every output the parent and the child compare for one family."""
    forward, more = CHECKS[family]
    return {**forward(model, x), **more(model, x)}


class RefuseCloverCore(importlib.abc.MetaPathFinder):
    """Makes any import of clover_core fail, as on a machine where it is not installed."""

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "clover_core":
            raise ImportError("clover_core is not available here: the folder must load without it")
        return None


def plain_load_error(family: str, folder: str) -> str:
    """What the library's own class says about the folder without remote code (it must refuse)."""
    library, _ = LOADERS[family]
    cls = getattr(importlib.import_module(library), PLAIN[family])
    try:
        cls.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return ""


def run(job: dict) -> dict:
    """Load one folder with its auto class, write its outputs, and report what was loaded."""
    from safetensors.torch import load_file, save_file

    family, report = job["family"], {}
    try:
        library, auto = LOADERS[family]
        model = getattr(importlib.import_module(library), auto).from_pretrained(job["folder"], trust_remote_code=True)
        report["class"] = f"{type(model).__module__}.{type(model).__name__}"
        report["dtype"] = str(next(model.parameters()).dtype)
        report["training"] = model.training
        result = outputs(family, model.eval(), load_file(job["inputs"]))
        save_file({k: v.contiguous() for k, v in result.items()}, job["outputs"])
        report["plain_load_error"] = plain_load_error(family, job["folder"])
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test with it
        report["error"] = traceback.format_exc()
    return report


def main(jobs_path: str, reports_path: str) -> None:
    sys.meta_path.insert(0, RefuseCloverCore())
    reports = {name: run(job) for name, job in json.loads(open(jobs_path).read()).items()}
    imported = any(m.partition(".")[0] == "clover_core" for m in sys.modules)
    with open(reports_path, "w") as f:
        json.dump({"clover_core_imported": imported, "jobs": reports}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
