"""The fine-tuning comparison's fairness rules: the data split and the matched parameter budgets."""

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demos"))
import finetune_compare as fc  # noqa: E402

import clover_core as cc  # noqa: E402
from clover_core.data import bundled_text  # noqa: E402


def test_paradise_lost_splits_into_train_validation_and_test_books():
    parts = fc.split_books(bundled_text("paradise_lost"))
    assert parts["val"].startswith("BOOK IX") and parts["test"].startswith("BOOK X")
    assert "BOOK IX" not in parts["train"] and "BOOK X" not in parts["train"] + parts["val"]
    with pytest.raises(ValueError, match="expected the 10 books"):
        fc.split_books("BOOK I.\nonly one book\n")


@pytest.mark.parametrize("target", ["qk", "vo", "both"])
def test_lora_budget_matches_clover_ft(make_gpt2, target):
    model = make_gpt2("2x32")
    budget = cc.finetune.prepare(copy.deepcopy(model), target).trainable_parameters()[0]
    names = fc.lora_targets(model, target, mlp=False)
    rank = fc.lora_rank(model, names, budget)
    per_rank = sum(sum(model.get_submodule(n).weight.shape) for n in names)
    assert abs(rank * per_rank - budget) <= per_rank / 2  # the closest rank to CLOVER-FT's count


def test_every_method_gets_the_same_batches():
    import torch

    train = torch.arange(1000)
    a, b = fc.batches(train, 5, 4, 16, seed=0), fc.batches(train, 5, 4, 16, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (4, 16)
    assert not torch.equal(a[0], fc.batches(train, 5, 4, 16, seed=1)[0])
