#!/usr/bin/env python3
"""Prove that retailklip's EfficientViT-SAM is weight- and output-compatible with the official code.

No official checkpoint can be downloaded in CI, so compatibility is shown with random weights:

1. build each official model (``efficientsam.sam_model_zoo.create_efficientvit_sam_model(name,
   pretrained=False)``, the pip package of ``mit-han-lab/efficientvit``'s SAM code) with a
   fixed seed, give its norm layers distinct random statistics (default init makes them all
   equal, which would hide swapped keys), save its state dict to a ``.pt`` file exactly as an official checkpoint is stored;
2. load that file, unchanged, with ``retailklip.segment.create_model(name, checkpoint=...)``;
3. compare on real photos (``../shared/data/grocery-store``): image embeddings (official
   ``EfficientViTSamPredictor.set_image`` features vs ``image_embeddings``), mask logits and
   predicted IoUs for a batched point grid (``predict_torch``), and, with ``--amg``, the binary
   masks of automatic mask generation;
4. compare state-dict (key, shape) lists, and with ``--write-keys DIR`` write them as the
   committed test data ``tests/data/efficientvit_sam/<variant>.json``.

The official code is the ``efficientsam`` package (a test extra of pyproject.toml; nothing is
fetched or committed). ``tests/test_segment_model.py::test_bit_exact_with_the_official_model``
runs the same comparison for the cheap variants in the normal test suite; this script covers
all five, automatic mask generation, and prints the table of docs/segmentation.md.

Usage::

    python tools/check_efficientvit_equivalence.py \
        [--variants efficientvit-sam-l0 ...] [--amg] [--write-keys tests/data/efficientvit_sam]

Exit status 1 if any difference exceeds ``--tol`` (default 1e-4) or a key list differs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store" / "dataset"
DEFAULT_IMAGES = (
    "val/Fruit/Banana/Banana_001.jpg",  # 348x348
    "train/Fruit/Kiwi/Kiwi_013.jpg",  # 348x464 portrait
    "train/Fruit/Orange/Orange_018.jpg",  # 464x348 landscape
)
VARIANTS = ("efficientvit-sam-l0", "efficientvit-sam-l1", "efficientvit-sam-l2", "efficientvit-sam-xl0", "efficientvit-sam-xl1")

sys.path.insert(0, str(REPO_ROOT))


def import_official() -> tuple[types.ModuleType, types.ModuleType]:
    """The official model zoo and SAM module, from the ``efficientsam`` package (the test extra).

    ``efficientsam`` is mit-han-lab/efficientvit's EfficientViT-SAM code packaged for pip; its
    model code equals ``mit-han-lab/efficientvit@de7d7733`` apart from import paths, and it
    vendors segment_anything as ``efficientsam.segment_anything`` (no clash with the
    ``segment_anything`` package our model uses).

    Returns:
        ``(efficientsam.sam_model_zoo, efficientsam.models.efficientvit.sam)`` modules.

    Raises:
        SystemExit: the package is not installed (``pip install -e .[test]``).
    """
    try:
        zoo = importlib.import_module("efficientsam.sam_model_zoo")
        sam = importlib.import_module("efficientsam.models.efficientvit.sam")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"{exc}: install the official code with `pip install efficientsam` (the test extra)") from None
    return zoo, sam


def randomize_norm_layers(model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm/LayerNorm distinct random statistics and affine parameters.

    PyTorch initialises all norm layers identically (weight 1, bias 0, running mean 0, var 1),
    so a key mapping that swapped two same-shaped norm layers would go unnoticed; after this,
    it cannot.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            is_norm = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))
            is_norm = is_norm or type(module).__name__ == "LayerNorm2d"
            if not is_norm or weight is None:
                continue
            weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def key_shape_list(state_dict: dict[str, torch.Tensor]) -> list[list]:
    """``[[key, [dims...]], ...]`` in state-dict order."""
    return [[k, list(v.shape)] for k, v in state_dict.items()]


def dump_key_list(payload: dict) -> str:
    """JSON text with one ``[key, shape]`` entry per line (diff-friendly)."""
    head = {k: v for k, v in payload.items() if k != "keys"}
    lines = [json.dumps(entry) for entry in payload["keys"]]
    body = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
    return body + ',\n "keys": [\n' + ",\n".join(lines) + "\n ]\n}\n"


def load_photos(paths: list[str]) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    photos = []
    for rel in paths:
        p = Path(rel) if Path(rel).is_absolute() else DATA_ROOT / rel
        if not p.is_file():
            print(f"note: {p} not found, skipped", file=sys.stderr)
            continue
        photos.append((p.name, np.asarray(Image.open(p).convert("RGB"))))
    if not photos:
        raise SystemExit(f"no photo found under {DATA_ROOT}; pass --images")
    return photos


def compare_variant(name: str, zoo, official_sam, photos, args) -> list[dict]:
    from segment_anything.utils.amg import build_point_grid

    from retailklip.segment import (
        EFFICIENTVIT_SAM_CONFIGS,
        EfficientViTSamPredictor,
        MaskGeneratorOptions,
        build_mask_generator,
        create_model,
    )
    from retailklip.segment.checkpoint import local_to_official_key

    torch.manual_seed(args.seed)
    official = zoo.create_efficientvit_sam_model(name, pretrained=False).eval()
    randomize_norm_layers(official, args.seed)
    official_sd = official.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / EFFICIENTVIT_SAM_CONFIGS[name].checkpoint_file
        torch.save(official_sd, ckpt)  # stored exactly as the official checkpoints: a raw state dict
        ours = create_model(name, checkpoint=ckpt)

    official_keys = key_shape_list(official_sd)
    our_keys = [[local_to_official_key(k), list(v.shape)] for k, v in ours.state_dict().items()]
    keys_equal = official_keys == our_keys
    if args.write_keys:
        out = Path(args.write_keys)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "variant": name,
            "source": (
                f"mit-han-lab/efficientvit@{args.official_ref}: efficientvit.sam_model_zoo."
                f"create_efficientvit_sam_model({name!r}, pretrained=False).state_dict()"
            ),
            "num_tensors": len(official_keys),
            "keys": official_keys,
        }
        (out / f"{name}.json").write_text(dump_key_list(payload))

    off_pred = official_sam.EfficientViTSamPredictor(official)
    our_pred = EfficientViTSamPredictor(ours)
    rows = []
    for photo_name, rgb in photos:
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        off_pred.set_image(rgb)
        t1 = time.perf_counter()
        our_emb = ours.image_embeddings(rgb)
        t2 = time.perf_counter()
        emb_diff = (off_pred.features - our_emb).abs().max().item()

        our_pred.set_image(rgb)
        points = torch.as_tensor(build_point_grid(args.points_per_side) * np.array([w, h]), dtype=torch.float32)
        labels = torch.ones(len(points), 1, dtype=torch.int)
        off_masks, off_iou, _ = off_pred.predict_torch(
            off_pred.apply_coords_torch(points)[:, None, :], labels, multimask_output=True, return_logits=True
        )
        our_masks, our_iou, _ = our_pred.predict_torch(
            our_pred.transform.apply_coords_torch(points, (h, w))[:, None, :], labels, multimask_output=True, return_logits=True
        )
        row = {
            "variant": name,
            "image": f"{photo_name} ({w}x{h})",
            "keys_equal": keys_equal,
            "num_tensors": len(official_keys),
            "embedding_max_abs_diff": emb_diff,
            "embedding_max_abs": our_emb.abs().max().item(),
            "mask_logit_max_abs_diff": (off_masks - our_masks).abs().max().item(),
            "mask_logit_max_abs": our_masks.abs().max().item(),
            "iou_pred_max_abs_diff": (off_iou - our_iou).abs().max().item(),
            "binary_mask_pixels_differing": int(((off_masks > 0) != (our_masks > 0)).sum()),
            "binary_mask_pixels": int(our_masks.numel()),
            "official_encoder_s": t1 - t0,
            "our_encoder_s": t2 - t1,
        }
        if args.amg:
            opts = MaskGeneratorOptions(points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
            off_records = official_sam.EfficientViTSamAutomaticMaskGenerator(
                official, points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0
            ).generate(rgb)
            our_records = build_mask_generator(ours, opts).generate(rgb)
            same = len(off_records) == len(our_records) and all(
                np.array_equal(a["segmentation"], b["segmentation"]) for a, b in zip(off_records, our_records)
            )
            row["amg_masks"] = f"{len(off_records)}/{len(our_records)} {'identical' if same else 'DIFFERENT'}"
            row["amg_identical"] = same
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--official-ref", default="de7d7733cc0329f391b33f1f459271562ec27bd5",
        help="mit-han-lab/efficientvit commit the installed efficientsam model code equals, recorded in --write-keys files",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), help=f"photos, relative to {DATA_ROOT}")
    parser.add_argument("--points-per-side", type=int, default=4, help="point grid of the mask comparison")
    parser.add_argument("--amg", action="store_true", help="also compare automatic mask generation (slow on CPU)")
    parser.add_argument("--write-keys", metavar="DIR", help="write the official (key, shape) list per variant as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    zoo, official_sam = import_official()
    photos = load_photos(args.images)
    rows = []
    for name in args.variants:
        rows += compare_variant(name, zoo, official_sam, photos, args)

    print()
    header = "| variant | image | keys==official | max abs diff embedding | max abs diff mask logits | max abs diff IoU pred | binary mask px differing |"
    if args.amg:
        header += " AMG masks official/ours |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ok = True
    for r in rows:
        line = (
            f"| {r['variant']} | {r['image']} | {'yes' if r['keys_equal'] else 'NO'} ({r['num_tensors']}) "
            f"| {r['embedding_max_abs_diff']:.3g} (of {r['embedding_max_abs']:.3g}) "
            f"| {r['mask_logit_max_abs_diff']:.3g} (of {r['mask_logit_max_abs']:.3g}) "
            f"| {r['iou_pred_max_abs_diff']:.3g} | {r['binary_mask_pixels_differing']} of {r['binary_mask_pixels']} |"
        )
        if args.amg:
            line += f" {r['amg_masks']} |"
            ok &= r["amg_identical"]
        print(line)
        ok &= r["keys_equal"] and max(r["embedding_max_abs_diff"], r["mask_logit_max_abs_diff"], r["iou_pred_max_abs_diff"]) <= args.tol
    print(f"\n{'PASS' if ok else 'FAIL'}: tolerance {args.tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
