"""Pruned folders load with transformers / diffusers ALONE (``trust_remote_code=True``).

Each case prunes a tiny model (mode global, so ranks are ragged) and saves it; ONE fresh Python that
cannot import clover_core (tests/remote_child.py, copied outside the project) loads every folder with
the library's auto class and writes its outputs, which must equal the in-memory pruned model's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import clover_core as cc
from clover_core.record import pruning_record

from . import remote_child
from .conftest import unet_inputs
from .tolerances import FP32

pytestmark = [pytest.mark.slow]

FEATS = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(3))
DEC_IDS = torch.tensor([[1, 5, 7, 9, 11]])
LM_IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))


class Case(NamedTuple):
    family: str
    fixture: str
    kwargs: dict
    target: str
    ratio: float = 0.5  # chosen so that mode="global" leaves ragged ranks on each tiny model
    dtype: torch.dtype | None = None


CASES = {
    "gpt2": Case("gpt2", "make_gpt2", {"shape": "5x8"}, "both"),
    "gpt2-bfloat16": Case("gpt2", "make_gpt2", {"shape": "3x16"}, "both", dtype=torch.bfloat16),
    "llama": Case("llama", "make_llama", {}, "vo", ratio=0.4),
    "llama-bias": Case("llama", "make_llama", {"bias": True}, "vo", ratio=0.4),
    "whisper": Case("whisper", "make_whisper", {}, "both"),
    "unet": Case("unet", "make_unet", {}, "both"),
}


def inputs_for(family: str) -> dict[str, torch.Tensor]:
    if family == "whisper":
        return {"features": FEATS, "dec_ids": DEC_IDS}
    if family == "unet":
        latents, timestep, states, added = unet_inputs()
        return {"latents": latents, "timestep": timestep, "states": states, **added}
    return {"ids": LM_IDS}


def prepare(name: str, case: Case, request, work: Path) -> tuple[dict, dict]:
    """Prune and save one case; its child job and the outputs the child must reproduce."""
    original = request.getfixturevalue(case.fixture)(**case.kwargs)
    pruned = cc.prune(original, ratio=case.ratio, target=case.target, mode="global")
    ranks = [r for pairs in pruning_record(pruned)["ranks"].values() for rs in pairs.values() for r in rs]
    assert len(set(ranks)) > 1, f"{name}: ranks should be ragged, so the padding is exercised"
    folder = cc.save_pruned(pruned, work / name, dtype=case.dtype)
    reference = pruned if case.dtype is None else cc.load_pruned(folder)  # the saved rounding
    inputs = inputs_for(case.family)
    expected = remote_child.outputs(case.family, reference, inputs)
    forward = remote_child.CHECKS[case.family][0]
    ((key, unpruned),) = forward(original, inputs).items()
    assert not torch.allclose(unpruned.float(), expected[key].float(), **FP32), f"{name}: pruning changed nothing"
    save_file({k: v.contiguous() for k, v in inputs.items()}, work / f"{name}.inputs.safetensors")
    job = {
        "family": case.family,
        "folder": str(folder),
        "inputs": str(work / f"{name}.inputs.safetensors"),
        "outputs": str(work / f"{name}.outputs.safetensors"),
    }
    return job, expected


def run_child(jobs: dict, work: Path) -> dict:
    """Run tests/remote_child.py in a fresh, isolated interpreter, from a folder outside the project."""
    child_dir = work / "child"
    child_dir.mkdir(parents=True)
    script = shutil.copy(remote_child.__file__, child_dir / "remote_child.py")
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(work / "modules"),
        HF_HOME=str(work / "hf"),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )  # the same reduction order as this process
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(work / "jobs.json"), str(work / "report.json")],
        cwd=child_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


def problems(name: str, case: Case, report: dict, expected: dict, job: dict) -> list[str]:
    """Everything wrong with one case's child run (empty when it loaded and matched)."""
    if "error" in report:
        return [f"{name}: {report['error']}"]
    found = []
    if not report["class"].rpartition(".")[2].startswith("Clover"):
        found.append(f"{name}: loaded {report['class']}, not the folder's own class")
    if report["dtype"] != str(case.dtype or torch.float32) or report["training"]:
        found.append(f"{name}: loaded as {report['dtype']}, training={report['training']}")
    if not report["plain_load_error"]:
        found.append(f"{name}: the library's plain class loaded the pruned shapes instead of refusing them")
    got = load_file(job["outputs"])
    for key, value in expected.items():
        try:  # bfloat16 too: the same ops on the same weights
            torch.testing.assert_close(got[key], value, **FP32)
        except (AssertionError, KeyError) as e:
            found.append(f"{name}: {key} differs: {e}")
    return found


def test_pruned_folders_load_without_clover_core(request, tmp_path):
    jobs, expected = {}, {}
    for name, case in CASES.items():
        jobs[name], expected[name] = prepare(name, case, request, tmp_path)

    report = run_child(jobs, tmp_path / "work")

    assert report["clover_core_imported"] is False
    found = [
        p
        for name, case in CASES.items()
        for p in problems(name, case, report["jobs"][name], expected[name], jobs[name])
    ]
    assert not found, "\n\n".join(found)


def test_a_folder_resaved_from_the_shipped_class_still_loads_in_clover_core(make_gpt2, tokens, tmp_path):
    from clover_core.architectures.remote.modeling_clover_gpt2 import CloverGPT2LMHeadModel

    pruned = cc.prune(make_gpt2("5x8"), ratio=0.5, target="both", mode="global")
    shipped = CloverGPT2LMHeadModel.from_pretrained(cc.save_pruned(pruned, tmp_path / "ckpt")).eval()
    shipped.save_pretrained(tmp_path / "resaved")  # config.json now names CloverGPT2LMHeadModel
    again = cc.load_pruned(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, pruned(tokens).logits, **FP32)


def test_the_shipped_class_refuses_a_folder_without_clover_ranks(make_gpt2, tmp_path):
    from clover_core.architectures.remote.modeling_clover_gpt2 import CloverGPT2LMHeadModel

    make_gpt2().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'clover' entry"):
        CloverGPT2LMHeadModel.from_pretrained(tmp_path / "plain")
