"""Finetuning an encoder whose embedding is more than the pooled output (``--encoder-option
feature_stage=["pooled", -1]`` or ``scales=[...]``): blockwise learning-rate decay reaches the
wrapped timm model, ArcFace sees the embedding's per-part normalisation, and the export is the
timm model's plain state dict.  Real GroceryStore photos and the shared ImageNet MobileNetV2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC

from finetune.config import TrainConfig
from finetune.model import freeze_batchnorm
from finetune.optim import param_groups
from finetune.step import Stepper
from finetune.train import Trainer
from retailklip.encoders import create_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGE = {**MOBILENET_OPTIONS, "feature_stage": ["pooled", -1]}


class _Spy(torch.nn.Module):
    """A loss that records the features it is given (sum of squares, so it has a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.seen.append(feats.detach().clone())
        return (feats**2).sum()


def _stepper(model: torch.nn.Module, loss: torch.nn.Module, groups) -> Stepper:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Stepper(model, loss, opt, sched, device=torch.device("cpu"), precision="fp32", groups=groups)


def test_stepper_normalises_each_part_before_the_loss(mobilenet_weights, val_photos):
    enc = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **STAGE)
    assert enc.groups == (1280, 320)
    freeze_batchnorm(enc)  # as the trainer does: train mode then computes what eval mode does
    x = torch.stack([enc.prepare(p) for p, _ in val_photos[:3]])
    y = torch.tensor([0, 1, 2])
    spy = _Spy()
    _stepper(enc.model, spy, enc.groups).train_batch(x, y)
    _stepper(enc.model, spy, 1).train_batch(x, y)
    parted, raw = spy.seen
    for part in torch.split(parted, [1280, 320], dim=1):  # each part unit norm / sqrt(2): the whole row unit norm
        np.testing.assert_allclose(part.norm(dim=1).numpy(), 2**-0.5, rtol=1e-5)
    assert (raw.norm(dim=1) > 2).all()  # one part: the raw features as before, not normalised
    # ArcFace's cosine between two rows is then the mean of the parts' cosines, the catalog's similarity
    a, b = parted[0], parted[1]
    parts = [torch.nn.functional.cosine_similarity(p, q, dim=0) for p, q in
             zip(torch.split(raw[0], [1280, 320]), torch.split(raw[1], [1280, 320]), strict=True)]
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) == pytest.approx(float(sum(parts) / 2), abs=1e-5)
    emb = enc.embed([p for p, _ in val_photos[:2]])  # and it is the embedding the catalog stores
    np.testing.assert_allclose(parted[:2].numpy(), emb, atol=1e-5)


def test_blockwise_decay_reaches_the_wrapped_model(mobilenet_weights):
    plain = param_groups(create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **MOBILENET_OPTIONS).model,
                         lr=1e-3, decay=0.9, frozen_blocks=3)
    staged = param_groups(create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **STAGE).model,
                          lr=1e-3, decay=0.9, frozen_blocks=3)
    assert [(g["name"], g["lr"]) for g in staged] == [(g["name"], g["lr"]) for g in plain]
    assert [g["param_names"] for g in staged] == [["backbone." + n for n in g["param_names"]] for g in plain]
    assert {g["name"].split("/")[0] for g in staged} >= {"block 3", "block 6", "head"}


def test_finetune_with_pooled_and_stage_exports_the_plain_weights(finetune_csvs, mobilenet_weights, tmp_path):
    cfg = TrainConfig(data=str(finetune_csvs["train"]), eval_data=str(finetune_csvs["eval"]), out=str(tmp_path),
                      encoder=MOBILENET_SPEC, weights=str(mobilenet_weights), encoder_options=STAGE, epochs=1, depth=3,
                      batch_size=4, warmup_epochs=0, lr=1e-3, freeze_blocks=3, workers=0, progress=False, device="cpu")
    t = Trainer(cfg)
    assert t.embedding_size == 1600 and t.stepper.groups == (1280, 320)
    t.train_epoch()
    path = t.export()
    photos = [finetune_csvs["photos"][c.name][5] for c in finetune_csvs["classes"][0:3]]  # not trained on
    trained = t.encoder.embed(photos)
    # the file is the timm model's state dict: it loads with the option (same embedding) and without it
    np.testing.assert_allclose(create_encoder(MOBILENET_SPEC, weights=path, **STAGE).embed(photos), trained, atol=1e-5)
    plain = create_encoder(MOBILENET_SPEC, weights=path, **MOBILENET_OPTIONS).embed(photos)
    np.testing.assert_allclose(plain, torch.nn.functional.normalize(torch.from_numpy(trained[:, :1280]), dim=1).numpy(),
                               atol=1e-5)
    raw = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **STAGE).embed(photos)
    assert np.abs(trained - raw).max() > 1e-3  # training moved it
