"""Outlier Exposure in the finetune (``--outlier-data``, finetune/loss.py ``OutlierExposureLoss``):
the loss on hand-made embeddings, and a training run on real GroceryStore photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC, write_role_csv

from finetune.cli import main
from finetune.config import TrainConfig
from finetune.data import prepare_data
from finetune.errors import FinetuneError
from finetune.loss import OutlierExposureLoss, create_arcface
from finetune.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arcface(classes: int = 4, dim: int = 8):
    torch.manual_seed(0)
    return create_arcface(classes, dim)


@torch.no_grad()
def test_without_outlier_rows_it_is_arcface():
    arc = _arcface()
    oe = OutlierExposureLoss(arc, 0.5)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    assert float(oe(x, y)) == pytest.approx(float(arc(x, y)), rel=1e-6)


@torch.no_grad()
def test_outlier_term_is_the_cross_entropy_from_uniform():
    arc = _arcface()
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, -1, -2])
    z = arc.get_logits(x[3:])
    expected = float(arc(x[:3], y[:3])) + 0.25 * float((torch.logsumexp(z, 1) - z.mean(1)).mean())
    assert float(OutlierExposureLoss(arc, 0.25)(x, y)) == pytest.approx(expected, rel=1e-6)
    only = OutlierExposureLoss(arc, 1.0)(x[3:], y[3:])  # a batch of outliers only: no ArcFace term
    assert float(only) == pytest.approx(float((torch.logsumexp(z, 1) - z.mean(1)).mean()), rel=1e-6)
    assert float(only) >= np.log(4) - 1e-5  # H(U; p) >= log C, equal only at the uniform softmax


def test_gradient_moves_an_outlier_off_its_nearest_class():
    arc = _arcface()
    oe = OutlierExposureLoss(arc, 1.0)
    w = torch.nn.functional.normalize(arc.W.detach().T, dim=1)
    x = (w[2] + 0.05 * torch.randn(8)).unsqueeze(0).requires_grad_(True)  # an outlier that looks like class 2
    opt = torch.optim.SGD([x], lr=0.5)

    @torch.no_grad()
    def top_prob() -> float:
        return float(torch.softmax(arc.get_logits(x.detach()), 1).max())

    before = top_prob()
    for _ in range(200):
        opt.zero_grad()
        oe(x, torch.tensor([-1])).backward()
        opt.step()
    assert before > 0.9 and top_prob() < 0.5  # 4 classes: uniform is 0.25


def test_weight_must_be_positive():
    with pytest.raises(FinetuneError, match="--outlier-weight must be > 0"):
        OutlierExposureLoss(_arcface(), 0.0)
    with pytest.raises(FinetuneError, match="--outlier-weight must be > 0"):
        TrainConfig(data="a", eval_data="b", out="c", outlier_weight=-1).validate()


@pytest.fixture(scope="module")
def real_csvs(tmp_path_factory, finetune_csvs) -> dict[str, Path]:
    """The shared train (3 classes x 3 photos) and eval (2 classes: packshot + 2 photos) CSVs, plus
    outliers: 2 other classes x 3 photos, and overlap: 2 more photos of a training class."""
    root = tmp_path_factory.mktemp("oe")
    photos, classes = finetune_csvs["photos"], finetune_csvs["classes"]
    train, other = classes[0:3], classes[70:72]
    return {
        "train": finetune_csvs["train"], "eval": finetune_csvs["eval"],
        "outliers": write_role_csv(root / "outliers.csv", [(str(q), c.name, "query") for c in other for q in photos[c.name][:3]]),
        "overlap": write_role_csv(root / "overlap.csv", [(str(q), train[0].name, "query") for q in photos[train[0].name][3:5]]),
    }


def test_training_draws_outliers_as_balanced_negative_targets(real_csvs, tmp_path):
    cfg = TrainConfig(data=str(real_csvs["train"]), eval_data=str(real_csvs["eval"]), out=str(tmp_path),
                      encoder=TINY_CLIP_SPEC, random_init=True, encoder_options=TINY_CLIP_OPTIONS, epochs=1, depth=2,
                      batch_size=4, workers=0, progress=False, device="cpu", outlier_data=str(real_csvs["outliers"]),
                      outlier_weight=0.5)
    t = Trainer(cfg)
    assert isinstance(t.objective, OutlierExposureLoss) and t.objective.arcface is t.loss_fn
    assert len(t.data.outliers) == 6 and sorted(set(t.data.outlier_targets().tolist())) == [-2, -1]
    assert len(t.sampler) == (3 + 2) * 2  # each outlier label balanced like a class
    drawn = t.targets[t.sampler.epoch_indices(0)]
    assert (drawn < 0).sum() == 4 and all((drawn == c).sum() == 2 for c in range(3))
    fp = t.fingerprint()
    assert fp["outlier_images"] == 6 and fp["outlier_weight"] == 0.5
    metrics = t.train_epoch()
    assert metrics["train_images"] == 10 and np.isfinite(metrics["train_loss"])


def test_outliers_that_are_training_classes_are_refused_in_one_line(real_csvs, tmp_path, capsys):
    with pytest.raises(FinetuneError, match="training or evaluation classes"):
        prepare_data(str(real_csvs["train"]), str(real_csvs["eval"]), workers=1, outlier_data=str(real_csvs["overlap"]))
    rc = main(["--data", str(real_csvs["train"]), "--eval-data", str(real_csvs["eval"]), "--encoder", TINY_CLIP_SPEC,
               "--random-init", "--encoder-option", "model_overrides=" + json.dumps(TINY_CLIP_OPTIONS["model_overrides"]),
               "--outlier-data", str(real_csvs["overlap"]), "--out", str(tmp_path / "o"), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("finetune: error:") and "outliers must be other products" in err and "\n" not in err
    assert not (tmp_path / "o" / "encoder.safetensors").exists()
