"""finetune/: data, class balancing, blockwise learning-rate decay, zero-shot evaluation, GroceryStore split.

Training loops (tiny OpenCLIP ViT, real MobileNetV2), resume and the CLI are in test_finetune_train.py.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
from PIL import Image

from finetune.data import (
    EvalSplit,
    LabeledData,
    check_disjoint,
    check_images,
    prepare_data,
    read_samples,
    with_reference_copies,
)
from finetune.errors import FinetuneError
from finetune.evaluate import ZeroShotEvaluator
from finetune.loss import create_arcface, imprint_class_weights
from finetune.optim import format_lr_table, param_groups, parameter_levels, warmup_cosine
from finetune.sampler import ClassBalancedSampler
from retailklip import create_encoder
from retailklip.augment import augment_reference
from retailklip.evaluation import score_zero_shot
from retailklip.images import load_image

# see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(path: Path, seed: int, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _write_csv(path: Path, rows: list[tuple], header=("image", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- class balancing (§4.1.3)
def test_sampler_gives_every_class_exactly_depth_images_per_epoch():
    sizes = [1, 2, 3, 7, 50]
    targets = np.repeat(np.arange(len(sizes)), sizes)
    depth = 5
    s = ClassBalancedSampler(targets, depth, seed=3)
    for epoch in range(3):
        s.set_epoch(epoch)
        idx = np.array(list(s))
        assert len(idx) == len(s) == len(sizes) * depth
        assert np.bincount(targets[idx], minlength=len(sizes)).tolist() == [depth] * len(sizes)
        for c, n in enumerate(sizes):
            picked = idx[targets[idx] == c]
            uses = np.bincount(picked, minlength=len(targets))[targets == c]
            if n >= depth:  # undersampled: distinct images
                assert len(set(picked.tolist())) == depth
            else:  # oversampled: every image used floor(d/n) or ceil(d/n) times
                assert set(uses.tolist()) <= {depth // n, math.ceil(depth / n)}
    s.set_epoch(0)
    first = list(s)
    assert list(s) == first  # the order depends on (seed, epoch) only
    s.set_epoch(1)
    assert list(s) != first
    assert list(ClassBalancedSampler(targets, depth, seed=4)) != first
    # classes are mixed across the epoch, not in blocks
    assert len(set(targets[first[:depth]].tolist())) > 1


def test_sampler_rejects_bad_depth():
    with pytest.raises(FinetuneError, match="depth"):
        ClassBalancedSampler([0, 1], 0)


# ---------------------------------------------------------------- blockwise learning-rate decay (§4.1.2)
def _lr_wd(groups) -> dict[str, tuple[float, float]]:
    out = {}
    for g in groups:
        for n in g["param_names"]:
            assert n not in out, f"{n} in two groups"
            out[n] = (g["lr"], g["weight_decay"])
    return out


def test_lr_groups_open_clip_vit_exactly_as_specified():
    enc = create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS)
    model = enc.model
    layers = len(model.transformer.resblocks)
    loss = create_arcface(5, enc.dim)
    groups = param_groups(model, lr=2e-4, decay=0.7, weight_decay=0.05, loss=loss, loss_lr=1e-2)
    got = _lr_wd(groups)
    assert set(got) == {n for n, _ in model.named_parameters()} | {"loss.W"}

    def expected_lr(name: str) -> float:
        if name.startswith("transformer.resblocks."):
            i = int(name.split(".")[2])
            return 2e-4 * 0.7 ** (layers - 1 - i)  # top block 2e-4, each lower x 0.7
        if name.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            return 2e-4 * 0.7**layers  # below the lowest block
        if name == "loss.W":
            return 1e-2
        assert name.split(".")[0] in ("ln_post", "proj"), name
        return 2e-4  # final norm and projection: the top rate

    params = dict(model.named_parameters())
    for name, (lr, wd) in got.items():
        assert lr == pytest.approx(expected_lr(name), rel=1e-12), name
        is_norm_or_bias = name != "loss.W" and (params[name].ndim < 2 or name.endswith("bias"))
        no_decay = is_norm_or_bias or name in ("loss.W", "positional_embedding")
        assert wd == (0.0 if no_decay else 0.05), name
    # the optimizer keeps them, and the schedule scales all groups alike
    opt = torch.optim.AdamW(groups)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    base = [g["initial_lr"] for g in opt.param_groups]
    for _ in range(4):
        opt.step()
        sched.step()
        ratios = [g["lr"] / b for g, b in zip(opt.param_groups, base)]
        assert max(ratios) - min(ratios) < 1e-12
    table = format_lr_table(groups)
    assert "block 1/decay" in table and "arcface W" in table and f"{2e-4 * 0.7**layers:.3e}" in table


def test_lr_groups_timm_trunk_stages_and_frozen_blocks():
    import timm
    from timm.layers import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0))
    _, num = parameter_levels(model)
    assert num == len(model.blocks) == 7
    groups = param_groups(model, lr=1e-3, decay=0.5, weight_decay=0.01, frozen_blocks=2)
    got = _lr_wd(groups)
    names = {n for n, _ in model.named_parameters()}
    frozen = {n for n in names if n.startswith(("conv_stem", "blocks.0.", "blocks.1."))}
    assert frozen and set(got) == names - frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    for name, (lr, wd) in got.items():
        if name.startswith("blocks."):
            assert lr == pytest.approx(1e-3 * 0.5 ** (num - 1 - int(name.split(".")[1])))
        else:
            assert name.startswith("conv_head"), name  # the 1x1 head conv: top rate
            assert lr == 1e-3
        assert wd == 0.01  # frozen BatchNorm has no parameters left; convs decay
    with pytest.raises(FinetuneError, match="--freeze-blocks"):
        param_groups(model, frozen_blocks=8)


def test_lr_groups_timm_vit_norm_is_head():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=3, img_size=32)
    levels, num = parameter_levels(model)
    assert num == 3
    assert levels["cls_token"].name == levels["patch_embed.proj.weight"].name == "embed"
    assert levels["blocks.2.mlp.fc1.weight"].name == "block 2"
    assert levels["norm.weight"].name == "head"


def test_warmup_cosine_schedule_shape():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}])
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=20, min_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # then monotone cosine decay
    assert lrs[-1] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: half-way down


def test_onnx_export_works_or_says_what_is_missing(tmp_path):
    from finetune.export import export_onnx

    model = create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS).model
    try:
        import onnx
    except ImportError:
        with pytest.raises(FinetuneError, match="pip install onnx"):
            export_onnx(model, tmp_path / "e.onnx", (64, 64))
        return
    onnx.checker.check_model(onnx.load(str(export_onnx(model, tmp_path / "e.onnx", (64, 64)))))


# ---------------------------------------------------------------- ArcFace
def test_arcface_imprinting_points_proxies_at_class_means():
    torch.manual_seed(0)
    loss = create_arcface(3, 8)
    emb = torch.randn(9, 8)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    before = float(loss(emb, y).detach())
    assert imprint_class_weights(loss, emb, y) == 3
    w = torch.nn.functional.normalize(loss.W.detach(), dim=0)
    for c in range(3):
        unit = torch.nn.functional.normalize(emb[y == c], dim=1)
        mean = torch.nn.functional.normalize(unit.mean(0), dim=0)
        assert float(w[:, c] @ mean) == pytest.approx(1.0, abs=1e-5)
    assert float(loss(emb, y).detach()) < before
    with pytest.raises(FinetuneError):
        create_arcface(1, 8)
    with pytest.raises(FinetuneError, match="degrees"):
        create_arcface(3, 8, margin=120)


def test_subcenter_arcface_imprints_each_sub_center_from_its_own_images():
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    torch.manual_seed(0)
    loss = create_arcface(3, 8, sub_centers=2)
    assert isinstance(loss, SubCenterArcFaceLoss) and tuple(loss.W.shape) == (8, 6)
    emb = torch.randn(9, 8)
    y = torch.tensor([0, 1, 0, 1, 0, 2, 1, 2, 0])  # class 0: rows 0, 2, 4, 8; class 2: rows 5, 7
    before = float(loss(emb, y).detach())
    assert imprint_class_weights(loss, emb, y) == 3
    w = torch.nn.functional.normalize(loss.W.detach(), dim=0)
    unit = torch.nn.functional.normalize(emb, dim=1)

    def direction(rows):
        return torch.nn.functional.normalize(unit[rows].mean(0), dim=0)

    # class c's sub-center j is column c * 2 + j, the mean of the class's embeddings j, j + 2, ...
    for col, rows in {0: [0, 4], 1: [2, 8], 2: [1, 6], 3: [3], 4: [5], 5: [7]}.items():
        assert float(w[:, col] @ direction(rows)) == pytest.approx(1.0, abs=1e-5), col
    assert float(w[:, 0] @ w[:, 1]) < 0.99  # the sub-centers start apart
    assert float(loss(emb, y).detach()) < before
    with pytest.raises(FinetuneError, match="sub-centers"):
        create_arcface(3, 8, sub_centers=0)


# ---------------------------------------------------------------- data
def test_csv_roles_folders_and_bad_images(tmp_path):
    for i in range(4):
        _image(tmp_path / f"a{i}.png", i)
    (tmp_path / "broken.jpg").write_text("not an image")
    rows = [("a0.png", "x"), ("a1.png", "x"), ("a2.png", "y"), ("a3.png", "y"), ("missing.png", "y"), ("broken.jpg", "x")]
    samples = read_samples(_write_csv(tmp_path / "d.csv", rows))
    assert samples[0].path == tmp_path / "a0.png" and samples[0].role is None
    good, bad = check_images(samples, workers=2)
    assert [s.path.name for s in good] == ["a0.png", "a1.png", "a2.png", "a3.png"]
    assert sorted(p.name for p, _ in bad) == ["broken.jpg", "missing.png"]
    # without roles, the first image of a label is its reference
    split = EvalSplit.from_samples(good)
    assert [r.path.name for r in split.references] == ["a0.png", "a2.png"]
    assert [q.path.name for q in split.queries] == ["a1.png", "a3.png"]
    # with roles
    roles = read_samples(_write_csv(tmp_path / "r.csv", [("a0.png", "x", "query"), ("a1.png", "x", "reference"),
                                                           ("a2.png", "y", "reference")], ("image", "label", "role")))
    split = EvalSplit.from_samples(roles)
    assert [r.path.name for r in split.references] == ["a1.png", "a2.png"] and [q.path.name for q in split.queries] == ["a0.png"]
    two = read_samples(_write_csv(tmp_path / "t.csv", [("a0.png", "x", "reference"), ("a1.png", "x", "reference")],
                                  ("image", "label", "role")))
    with pytest.raises(FinetuneError, match="more than one reference"):
        EvalSplit.from_samples(two)
    with pytest.raises(FinetuneError, match="role must be"):
        read_samples(_write_csv(tmp_path / "b.csv", [("a0.png", "x", "gallery")], ("image", "label", "role")))
    # folder per class
    for label in ("p", "q"):
        (tmp_path / "f" / label).mkdir(parents=True)
        _image(tmp_path / "f" / label / "1.png", 1)
    (tmp_path / "f" / "p" / "notes.txt").write_text("x")
    data = LabeledData.from_samples(read_samples(tmp_path / "f"))
    assert data.classes == ["p", "q"] and data.targets.tolist() == [0, 1]


def test_data_errors_are_clear(tmp_path):
    _image(tmp_path / "a.png", 0)
    with pytest.raises(FinetuneError, match="no rows"):
        read_samples(_write_csv(tmp_path / "empty.csv", []))
    with pytest.raises(FinetuneError, match="image,label"):
        read_samples(_write_csv(tmp_path / "cols.csv", [("a.png", "x")], ("path", "class")))
    with pytest.raises(FinetuneError, match="only one class"):
        LabeledData.from_samples(read_samples(_write_csv(tmp_path / "one.csv", [("a.png", "x"), ("a.png", "x")])))
    with pytest.raises(FinetuneError, match="empty"):
        LabeledData.from_samples([])
    with pytest.raises(FinetuneError, match="no such file"):
        read_samples(tmp_path / "nope.csv")
    with pytest.raises(FinetuneError, match="held-out"):
        check_disjoint(["a", "b"], ["b", "c"])


def test_reference_copies_oversample_the_packshot_in_the_class_balanced_draw(grocery_store, tmp_path):
    """Real GroceryStore rows: two classes' in-store photos (role query) and packshots (role
    reference).  With N copies the packshot is N of the class's items, so the class-balanced
    sampler draws it with probability N / (photos + N) per draw instead of 1 / (photos + 1)."""
    classes = grocery_store.classes[:2]
    photos = {c.name: [p.path for p in grocery_store.photos("train") if p.label == c.name][:10] for c in classes}
    rows = [(str(q), c.name, "query") for c in classes for q in photos[c.name]]
    rows += [(str(c.iconic), c.name, "reference") for c in classes]
    train = _write_csv(tmp_path / "train.csv", rows, ("image", "label", "role"))
    held = grocery_store.classes[2:4]
    held_photo = {p.label: p.path for p in grocery_store.photos("train") if p.label in {c.name for c in held}}
    evals = _write_csv(tmp_path / "eval.csv", [r for c in held for r in ((str(c.iconic), c.name, "reference"),
                                                                          (str(held_photo[c.name]), c.name, "query"))],
                       ("image", "label", "role"))
    samples = read_samples(train)
    assert with_reference_copies(samples, 1) == samples
    six = with_reference_copies(samples, 6)
    assert six[:len(samples)] == samples and len(six) == len(samples) + 5 * 2
    assert all(s.role == "reference" for s in six[len(samples):])
    for copies in (1, 6):
        data = prepare_data(str(train), str(evals), workers=2, reference_copies=copies).train
        assert len(data.samples) == 22 + 2 * (copies - 1)
        is_packshot = np.array([s.role == "reference" for s in data.samples])
        sampler = ClassBalancedSampler(data.targets, depth=4, seed=0)
        drawn = []
        for epoch in range(300):
            sampler.set_epoch(epoch)
            drawn += list(sampler)
        share = is_packshot[drawn].mean()
        assert abs(share - copies / (10 + copies)) < 0.03, (copies, share)
    with pytest.raises(FinetuneError, match="role 'reference'"):
        with_reference_copies(read_samples(_write_csv(tmp_path / "noroles.csv", [(str(photos[classes[0].name][0]), "x")])), 3)
    with pytest.raises(FinetuneError, match=">= 1"):
        with_reference_copies(samples, 0)


# ---------------------------------------------------------------- zero-shot evaluation (§4.2)
def test_one_nn_accuracy_top1_and_per_class_average():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(6, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    g_labels = np.array([0, 0, 1, 1, 2, 2])
    # queries: noisy copies of gallery rows; a brute-force loop gives the expected predictions
    src = np.array([0, 1, 2, 3, 3, 3, 3, 4])
    q = gallery[src] + rng.normal(scale=0.6, size=(len(src), 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q_labels = g_labels[src].copy()
    q_labels[-1] = 0  # one deliberately wrong label
    pred = [g_labels[max(range(6), key=lambda j: float(q[i] @ gallery[j]))] for i in range(len(q))]
    correct = np.array(pred) == q_labels
    names = np.array(["a", "b", "c"])
    res = score_zero_shot(gallery, names[g_labels], q, names[q_labels])
    assert res.top1 == pytest.approx(correct.mean())
    per_class = {c: correct[q_labels == i].mean() for i, c in enumerate("abc") if (q_labels == i).any()}
    assert res.per_class_accuracy == pytest.approx(per_class)
    assert res.per_class_average == pytest.approx(np.mean(list(per_class.values())))
    assert res.queries == 8 and res.classes == 3
    with pytest.raises(ValueError):  # the library's evaluator (FinetuneError is a ValueError too)
        score_zero_shot(gallery[:0], names[g_labels[:0]], q, names[q_labels])


def test_evaluator_is_the_catalog_protocol(tmp_path):
    """Gallery = catalog's augment_reference views of each reference, embedded by the encoder."""
    rows = []
    for c in range(3):
        for i in range(3):
            rows.append((_image(tmp_path / f"{c}_{i}.png", 10 * c + i).name, f"c{c}"))
    split = EvalSplit.from_samples(read_samples(_write_csv(tmp_path / "e.csv", rows)))
    enc = create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS)
    k, seed = 3, 5
    res = ZeroShotEvaluator(split, enc, augmentations=k, seed=seed, progress=False)()
    gallery = np.concatenate([enc.embed(augment_reference(load_image(r.path), k, seed)) for r in split.references])
    queries = enc.embed([q.path for q in split.queries])
    want = score_zero_shot(gallery, np.repeat(split.classes, k), queries, [q.label for q in split.queries],
                           dataset="held-out", split="eval", augmentations=k, seed=seed)
    assert res.per_class_accuracy == pytest.approx(want.per_class_accuracy)
    assert res.to_dict(per_class=False) == pytest.approx(want.to_dict(per_class=False))
    enc.model.train()
    ZeroShotEvaluator(split, enc, augmentations=1, progress=False, cache_mb=0)()
    assert enc.model.training  # mode restored


# ---------------------------------------------------------------- GroceryStore split
def test_grocery_split_by_coarse_class(grocery, grocery_store, tmp_path, caplog):
    from finetune.grocery import write_split

    desc = write_split(grocery.parent, tmp_path, held_out_parity=0, train_queries=2)
    coarse_of = {c.name: c.coarse_id for c in grocery_store.classes}
    iconic = {c.name: c.iconic.resolve() for c in grocery_store.classes}
    train = read_samples(tmp_path / "train.csv")
    evals = read_samples(tmp_path / "eval.csv")
    train_coarse = {coarse_of[s.label] for s in train}
    eval_coarse = {coarse_of[s.label] for s in evals}
    assert train_coarse and eval_coarse and not train_coarse & eval_coarse
    assert all(c % 2 == 0 for c in eval_coarse)
    assert len(train_coarse | eval_coarse) == len(set(coarse_of.values()))
    assert all(s.path.resolve().exists() for s in train[:5] + evals[:5])
    split = EvalSplit.from_samples(evals)
    assert len(split.references) == len({s.label for s in evals}) == len(desc["held_out"]["fine"])
    assert all(r.path.resolve() == iconic[r.label] for r in split.references)
    n_val = sum(1 for p in grocery_store.photos("val") if coarse_of[p.label] % 2 == 0)
    assert n_val < len(split.queries) <= n_val + 2 * len(split.references)
    assert not {s.label for s in train} & {s.label for s in evals}
    assert len(train) == desc["train"]["images"]
    assert {s.role for s in train} == {"query"}  # photos only, none of them oversampled
    # --train-iconic: the training classes' packshots, as the 'reference' rows --reference-copies oversamples
    write_split(grocery.parent, tmp_path / "iconic", held_out_parity=0, train_queries=2, train_iconic=True)
    train_iconic = read_samples(tmp_path / "iconic" / "train.csv")
    refs = [s for s in train_iconic if s.role == "reference"]
    assert sorted(s.path.resolve() for s in refs) == sorted(iconic[c] for c in {s.label for s in train})
    assert all(iconic[s.label] == s.path.resolve() for s in refs)
    assert len(train_iconic) == len(train) + len(refs)
