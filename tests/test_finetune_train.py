"""finetune/ training: two steps on a tiny random OpenCLIP ViT, resume, the CLI, MobileNetV2 export."""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC, TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
from PIL import Image
from safetensors.torch import load_file

from finetune.cli import main
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.train import Trainer
from retailklip import create_encoder

TRAIN_SIZES = [2, 3, 5, 9]  # long-tailed
EVAL_CLASSES = 3

# see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(root: Path, name: str, n: int, seed: int) -> list[str]:
    """n noisy variants of one random 'product' pattern (so classes are learnable)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    out = []
    for i in range(n):
        a = np.kron(base, np.ones((6, 6, 1))) + rng.normal(0, 25, (48, 48, 3))
        p = root / f"{name}_{i}.png"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p)
        out.append(p.name)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for c, n in enumerate(TRAIN_SIZES):
            w.writerows((p, f"train{c}") for p in _images(root, f"t{c}", n, c))
    with open(root / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for c in range(EVAL_CLASSES):
            w.writerows((p, f"held{c}") for p in _images(root, f"e{c}", 3, 100 + c))
    return {"root": root, "train": root / "train.csv", "eval": root / "eval.csv"}


def _cfg(toy, out: Path, **kw) -> TrainConfig:
    base = {"data": str(toy["train"]), "eval_data": str(toy["eval"]), "out": str(out), "encoder": TINY_CLIP_SPEC,
            "random_init": True, "encoder_options": TINY_CLIP_OPTIONS, "epochs": 2, "depth": 3, "batch_size": 4,
            "augmentations": 2, "workers": 0, "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def _clip_options_args() -> list[str]:
    return ["--encoder-option", "model_overrides=" + json.dumps(TINY_CLIP_OPTIONS["model_overrides"])]


def test_two_steps_tiny_vit_lr_groups_and_loss_decreases(toy, tmp_path):
    t = Trainer(_cfg(toy, tmp_path, warmup_epochs=0, lr=1e-3, loss_lr=1e-2))
    model = t.model
    layers = len(model.transformer.resblocks)
    peak = {g["name"]: g["initial_lr"] for g in t.optimizer.param_groups}
    assert peak[f"block {layers - 1}/decay"] == pytest.approx(1e-3)
    for i in range(layers):
        assert peak[f"block {i}/decay"] == pytest.approx(1e-3 * 0.7 ** (layers - 1 - i))
    assert peak["embed/decay"] == pytest.approx(1e-3 * 0.7**layers)
    assert peak["head/no_decay"] == peak["head/decay"] == pytest.approx(1e-3)
    assert peak["arcface W"] == pytest.approx(1e-2)
    trained = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters()} | {id(t.loss_fn.W)}

    samples = t.data.train.samples
    x = torch.stack([t.encoder.prepare(s.path) for s in samples[:8]])
    y = torch.from_numpy(t.data.train.targets[:8])

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(t.loss_fn(model(x).float(), y))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = loss_now()
    for _ in range(2):
        t.train_batch(x, y, step=True)
    assert t.step == 2
    assert loss_now() < loss0
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_resume_gives_the_same_state(toy, tmp_path):
    a = Trainer(_cfg(toy, tmp_path / "a")).fit(export=False)
    b_cfg = _cfg(toy, tmp_path / "b")
    assert Trainer(b_cfg).fit(export=False, stop_after=1) is None
    assert not (tmp_path / "b" / "metrics.json").exists()
    b = Trainer(dataclasses.replace(b_cfg, resume="auto")).fit(export=False)
    for name in ("model.safetensors", "loss.safetensors"):
        sa, sb = load_file(str(tmp_path / "a/checkpoint" / name)), load_file(str(tmp_path / "b/checkpoint" / name))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    st_a = torch.load(tmp_path / "a/checkpoint/state.pt", weights_only=True)
    st_b = torch.load(tmp_path / "b/checkpoint/state.pt", weights_only=True)
    assert st_a["step"] == st_b["step"] > 0
    for i, s in st_a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, st_b["optimizer"]["state"][i][k])
    assert st_a["scheduler"] == st_b["scheduler"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["zero_shot_top1_before"] == b["zero_shot_top1_before"]
    # a checkpoint of another run is refused
    with pytest.raises(FinetuneError, match="different run"):
        Trainer(dataclasses.replace(b_cfg, depth=4, resume=str(tmp_path / "b/checkpoint"))).fit(export=False)


def test_cli_end_to_end_skips_bad_images_and_exports(toy, tmp_path, capsys):
    root = toy["root"]
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    train = tmp_path / "train.csv"
    with open(toy["train"], newline="") as f:
        header, *rows = list(csv.reader(f))
    with open(train, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([str(root / image), label] for image, label in rows)
        w.writerow([str(root / "corrupt.jpg"), "train0"])
        w.writerow([str(root / "missing.png"), "train1"])
    out = tmp_path / "run"
    rc = main(["--data", str(train), "--eval-data", str(toy["eval"]), "--encoder", TINY_CLIP_SPEC, "--random-init",
               *_clip_options_args(), "--epochs", "1", "--depth", "2", "--batch-size", "4", "--augmentations", "2",
               "--out", str(out), "--no-progress", "--export", "torchscript", "-q", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "zero-shot top-1" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for key in ("zero_shot_top1_before", "zero_shot_top1_after", "zero_shot_per_class_top1_before", "zero_shot_per_class_top1_after"):
        assert 0.0 <= m[key] <= 1.0
    assert m["skipped_images"] == {"train": 2, "eval": 0, "at_load": 0}
    assert m["train_images"] == sum(TRAIN_SIZES)
    skipped = (out / "skipped_images.csv").read_text()
    assert "corrupt.jpg" in skipped and "missing.png" in skipped
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["depth"] == 2 and cfg["param_groups"][-1]["name"] == "arcface W"
    assert cfg["catalog_command"].startswith(f"catalog init --encoder {TINY_CLIP_SPEC} --weights ")
    # the catalog's factory loads the weights; they are the trained module's (checkpoint) weights
    enc = create_encoder(TINY_CLIP_SPEC, weights=out / "encoder.safetensors", **TINY_CLIP_OPTIONS)
    trained = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in enc.model.state_dict().items())
    initial = create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS).model.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in enc.model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x
        scripted = torch.jit.load(str(out / "encoder.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), enc.model(x), rtol=1e-4, atol=1e-4)


def test_depth_sweep_runs_short_trainings_and_keeps_the_best(toy, tmp_path):
    from finetune.cli import run

    m = run(_cfg(toy, tmp_path, epochs=1, sweep_depth=[1, 3], sweep_epochs=1))
    sweep = m["depth_sweep"]
    assert [r["depth"] for r in sweep] == [1, 3]
    best = max(sweep, key=lambda r: (r["zero_shot_per_class_top1"], -r["depth"]))["depth"]
    assert m["depth"] == best
    assert json.loads((tmp_path / "config.json").read_text())["settings"]["depth"] == best
    for r in sweep:  # each depth trained C x d images in its own directory
        hist = json.loads((tmp_path / "sweep" / f"depth-{r['depth']}" / "metrics.json").read_text())["history"]
        assert hist[0]["train_images"] == len(TRAIN_SIZES) * r["depth"]


@pytest.mark.parametrize("case,message", [
    ("one_class", "only one class"),
    ("overlap", "held-out"),
    ("empty", "no rows"),
    ("no_weights", "not found"),
    ("copies_without_references", "role 'reference'"),
    ("copies_zero", "--reference-copies must be >= 1"),
])
def test_cli_errors_are_one_line(toy, tmp_path, capsys, case, message):
    train, evals, extra = toy["train"], toy["eval"], ["--random-init"]
    if case == "one_class":
        train = tmp_path / "one.csv"
        train.write_text("image,label\n" + "".join(f"{toy['root']}/t0_{i}.png,a\n" for i in range(2)))
    elif case == "overlap":
        evals = toy["train"]
    elif case == "empty":
        train = tmp_path / "empty.csv"
        train.write_text("image,label\n")
    elif case.startswith("copies"):
        extra += ["--reference-copies", "3" if case == "copies_without_references" else "0"]
    else:
        extra = ["--weights", str(tmp_path / "nope.safetensors")]
    rc = main(["--data", str(train), "--eval-data", str(evals), "--encoder", TINY_CLIP_SPEC, *extra, *_clip_options_args(),
               "--out", str(tmp_path / "o"), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("finetune: error:") and message in err and "\n" not in err


def test_mobilenet_frozen_bn_train_step_and_catalog_load(mobilenet_weights, val_photos, tmp_path):
    """The shared MobileNetV2's folded BatchNorms are detected and frozen: train mode then
    computes what eval mode does; after a step the export loads in the catalog's factory."""
    from finetune.export import save_encoder
    from finetune.loss import create_arcface
    from finetune.model import bn_looks_folded, freeze_batchnorm, resolve_freeze_bn
    from finetune.optim import create_optimizer, param_groups

    enc = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **MOBILENET_OPTIONS)
    assert bn_looks_folded(enc.model)
    assert resolve_freeze_bn("auto", enc.model, batch_size=64)  # folded: frozen even at a large batch
    paths = [p for p, _ in val_photos[:4]]
    reference = enc.embed(paths)
    x = torch.stack([enc.prepare(p) for p in paths])
    assert freeze_batchnorm(enc) == 52
    enc.model.train()
    with torch.no_grad():
        train_mode = torch.nn.functional.normalize(enc.model(x), dim=1).numpy()
    np.testing.assert_allclose(train_mode, reference, atol=1e-5)

    loss = create_arcface(2, enc.dim)
    opt = create_optimizer(param_groups(enc.model, lr=1e-3, loss=loss, frozen_blocks=5))
    y = torch.tensor([0, 0, 1, 1])
    loss(enc.model(x), y).backward()
    opt.step()
    path = save_encoder(enc.model, tmp_path / "encoder.safetensors")
    loaded = create_encoder(MOBILENET_SPEC, weights=path, **MOBILENET_OPTIONS)
    enc.model.eval()
    after = enc.embed(paths)
    np.testing.assert_allclose(loaded.embed(paths), after, atol=1e-5)
    assert np.abs(after - reference).max() > 1e-4  # the step changed the encoder
