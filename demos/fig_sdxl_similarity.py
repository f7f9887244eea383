"""SDXL UNet: similarity of the pruned model's image to the unpruned one (same prompt, seed and
scheduler) against the pruning ratio, CLOVER vs vanilla, Q-K and V-O of every attention block.

    python demos/fig_sdxl_similarity.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda
    python demos/fig_sdxl_similarity.py --model sdxl-tiny-random --steps 4        # offline, random weights

PSNR (dB) and SSIM against the unpruned image; nothing here needs a download beyond the model.
"""

from __future__ import annotations

import argparse

from sweep import cc, pick_device, ratio_figure, sweep, write

from clover_core.metrics import psnr, ssim
from clover_core.zoo.random_models import generate_image, with_unet

PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dawn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625,0.75")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    pipe = bundle.processor.to(device)
    reference = [generate_image(pipe, q, seed=args.seed, steps=args.steps, size=args.size) for q in PROMPTS]
    dec = cc.decompose(pipe.unet, progress=True)

    def evaluate(unet):
        images = [
            generate_image(with_unet(pipe, unet), q, seed=args.seed, steps=args.steps, size=args.size) for q in PROMPTS
        ]
        return {
            "psnr_db": sum(psnr(r, i) for r, i in zip(reference, images)) / len(images),
            "ssim": sum(ssim(r, i) for r, i in zip(reference, images)) / len(images),
        }

    rows = sweep(
        dec, evaluate, ratios=[float(r) for r in args.ratios.split(",")], targets=["qk", "vo"], label=args.model
    )
    for r in rows:  # identical images have infinite PSNR; cap it for the plot and the CSV
        r["psnr_db"] = min(r["psnr_db"], 100.0)
    fig = ratio_figure(
        rows,
        [("psnr_db", "PSNR vs unpruned (dB)"), ("ssim", "SSIM vs unpruned")],
        f"{args.model}: image similarity to the unpruned UNet vs global pruning ratio",
        log_y=False,
    )
    meta = {
        "model": args.model,
        "device": str(device),
        "steps": args.steps,
        "seed": args.seed,
        "prompts": list(PROMPTS),
        "psnr_cap_db": 100.0,
        "command": f"python demos/fig_sdxl_similarity.py --model {args.model} --steps {args.steps}",
    }
    write(f"sdxl_similarity_{args.model.split('/')[-1]}", rows, fig, meta)


if __name__ == "__main__":
    main()
