"""EfficientViT-SAM model: official key/shape layout, checkpoint loading and errors, preprocessing.

The (key, shape) lists in ``tests/data/efficientvit_sam/`` were generated from the official
``mit-han-lab/efficientvit`` code by ``tools/check_efficientvit_equivalence.py --write-keys``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from realphotos import grocery_rgb

from retailklip.errors import InvalidImageError, RetailKlipError, WeightsError
from retailklip.segment import (
    EFFICIENTVIT_SAM_CONFIGS,
    EfficientViTSam,
    EfficientViTSamPredictor,
    SegmenterOptionError,
    UnknownSegmenterError,
    build_efficientvit_sam,
    create_model,
    list_segmenters,
    load_segmenter,
    local_to_official_key,
    official_to_local_key,
    to_official_state_dict,
)
from retailklip.segment.transforms import preprocess

KEYS_DIR = Path(__file__).resolve().parent / "data" / "efficientvit_sam"
VARIANTS = tuple(EFFICIENTVIT_SAM_CONFIGS)


_photo = grocery_rgb


@pytest.fixture(scope="module")
def l0() -> EfficientViTSam:
    torch.manual_seed(0)
    return build_efficientvit_sam("efficientvit-sam-l0")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under ``tmp_path`` (``hf/hub``, ``torch/hub``),
    offline (``HF_HUB_OFFLINE``): what a fresh machine without network has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_official_keys_and_shapes(variant):
    expected = json.loads((KEYS_DIR / f"{variant}.json").read_text())
    assert expected["variant"] == variant
    with torch.device("meta"):
        model = build_efficientvit_sam(variant)
    ours = [[local_to_official_key(k), list(v.shape)] for k, v in model.state_dict().items()]
    assert len(ours) == expected["num_tensors"] == len(expected["keys"])
    assert ours == expected["keys"]  # same keys, same shapes, same order


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_mapping_is_a_bijection(variant):
    expected = json.loads((KEYS_DIR / f"{variant}.json").read_text())
    official = [k for k, _ in expected["keys"]]
    local = [official_to_local_key(k) for k in official]
    assert len(set(local)) == len(local)
    assert [local_to_official_key(k) for k in local] == official
    # The remapped prefixes are exactly the ones documented in retailklip.segment.checkpoint.
    assert any(k.startswith("image_encoder.backbone.stem.in_conv.") for k in local)
    assert not any(".op_list." in k for k in local)


def test_loads_official_layout_raw_and_wrapped(tmp_path, l0):
    official = to_official_state_dict(l0.state_dict())
    assert "image_encoder.backbone.stages.0.op_list.0.conv.weight" in official
    raw = tmp_path / "efficientvit_sam_l0.pt"
    wrapped = tmp_path / "wrapped.pt"
    torch.save(official, raw)
    torch.save({"state_dict": official, "epoch": 7}, wrapped)
    for path in (raw, wrapped):
        model = create_model("efficientvit-sam-l0", checkpoint=path)
        loaded = model.state_dict()
        for k, v in l0.state_dict().items():
            assert torch.equal(loaded[k], v), k
        assert not model.training


def test_num_batches_tracked_may_be_absent(tmp_path, l0):
    sd = {k: v for k, v in to_official_state_dict(l0.state_dict()).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pt"
    torch.save(sd, path)
    model = create_model("efficientvit-sam-l0", checkpoint=path)
    assert torch.equal(model.state_dict()["image_encoder.norm.weight"], l0.state_dict()["image_encoder.norm.weight"])


def test_no_checkpoint_names_file_and_flag(empty_caches):
    with pytest.raises(WeightsError, match=r"efficientvit_sam_l0\.pt.*--checkpoint"):
        load_segmenter("efficientvit-sam-l0")
    with pytest.raises(WeightsError, match=r"sam_vit_b_01ec64\.pth.*--checkpoint"):
        load_segmenter("sam-vit-b")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsError, match=r"not found.*efficientvit_sam_xl1\.pt.*--checkpoint"):
        load_segmenter("efficientvit-sam-xl1", checkpoint=tmp_path / "nope.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"\x80\x04K\x01."])
def test_unreadable_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"efficientvit_sam_l0\.pt.*--checkpoint"):
        create_model("efficientvit-sam-l0", checkpoint=path)


class _Payload:  # a pickled object weights_only loading must refuse
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(WeightsError, match="safe PyTorch state dict"):
        create_model("efficientvit-sam-l0", checkpoint=path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_wrong_architecture_checkpoint(tmp_path, l0):
    sd = to_official_state_dict(l0.state_dict())
    # An L0 file offered as L1: L1's extra blocks are missing.
    path = tmp_path / "l0.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"not a efficientvit-sam-l1 checkpoint.*missing keys.*efficientvit_sam_l1\.pt"):
        create_model("efficientvit-sam-l1", checkpoint=path)
    # A shape mismatch and a foreign key.
    sd2 = dict(sd)
    sd2["image_encoder.norm.weight"] = torch.zeros(128)
    sd2["head.fc.weight"] = torch.zeros(3)
    torch.save(sd2, path)
    with pytest.raises(WeightsError, match=r"unexpected keys.*head\.fc\.weight.*shape mismatches.*image_encoder\.norm\.weight"):
        create_model("efficientvit-sam-l0", checkpoint=path)
    # A SAM ViT-B file is not an EfficientViT-SAM file.
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, path)
    with pytest.raises(WeightsError, match="missing keys"):
        create_model("efficientvit-sam-l0", checkpoint=path)


def test_names_and_argument_errors(tmp_path):
    assert list_segmenters() == (
        "efficientvit-sam-l0", "efficientvit-sam-l1", "efficientvit-sam-l2", "efficientvit-sam-xl0",
        "efficientvit-sam-xl1", "sam-vit-b", "sam-vit-l", "sam-vit-h", "whole-image",
    )
    with pytest.raises(UnknownSegmenterError, match="efficientvit-sam-l0.*whole-image"):
        load_segmenter("efficientvit-sam-s9")
    with pytest.raises(SegmenterOptionError, match="not both"):
        create_model("efficientvit-sam-l0", checkpoint=tmp_path / "x.pt", random_init=True)
    with pytest.raises(WeightsError, match="whole-image uses no weights"):
        load_segmenter("whole-image", checkpoint=tmp_path / "x.pt")
    with pytest.raises(SegmenterOptionError, match="invalid device"):
        load_segmenter("whole-image", device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(SegmenterOptionError, match="CUDA is not available.*--device cpu"):
            load_segmenter("efficientvit-sam-l0", random_init=True, device="cuda")
    assert issubclass(SegmenterOptionError, RetailKlipError) and issubclass(UnknownSegmenterError, RetailKlipError)


def _official_transform(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The official EfficientViTSam.transform, spelled with torchvision as upstream does."""
    import torch.nn.functional as F
    import torchvision.transforms as T
    from torchvision.transforms.functional import resize, to_pil_image

    h, w = rgb.shape[:2]
    if max(h, w) != size:
        scale = size / max(h, w)
        rgb = np.array(resize(to_pil_image(rgb), (int(h * scale + 0.5), int(w * scale + 0.5))))
    x = T.Normalize(mean=[123.675 / 255, 116.28 / 255, 103.53 / 255], std=[58.395 / 255, 57.12 / 255, 57.375 / 255])(
        T.ToTensor()(rgb)
    )
    return F.pad(x, (0, size - x.shape[2], 0, size - x.shape[1]), value=0)[None]


@pytest.mark.parametrize("rel", ["train/Fruit/Kiwi/Kiwi_013.jpg", "train/Fruit/Orange/Orange_018.jpg"])
@pytest.mark.parametrize("size", [512, 1024])
def test_preprocessing_is_the_official_one(rel, size):
    rgb = _photo(rel)
    ours = preprocess(rgb, size)
    assert ours.shape == (1, 3, size, size) and ours.dtype == torch.float32
    assert torch.equal(ours, _official_transform(rgb, size))


def test_image_embeddings_shape_and_bad_input(l0):
    rgb = _photo("train/Fruit/Kiwi/Kiwi_013.jpg")  # 348x464, portrait
    emb = l0.image_embeddings(rgb)
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    # The channel LayerNorm (unit weight, zero bias at init) normalises every position.
    assert torch.allclose(emb.mean(dim=1), torch.zeros(1, 64, 64), atol=1e-4)
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 5, 3), np.uint8), [1, 2]):
        with pytest.raises(InvalidImageError):
            l0.image_embeddings(bad)


def test_predictor_prompts_in_original_pixels(l0):
    rgb = _photo("train/Fruit/Orange/Orange_018.jpg")  # 464x348, landscape
    predictor = EfficientViTSamPredictor(l0)
    predictor.set_image(rgb)
    assert predictor.input_size == (768, 1024) and predictor.original_size == (348, 464)
    masks, iou, low_res = predictor.predict(point_coords=np.array([[100.0, 200.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 348, 464) and masks.dtype == bool
    assert iou.shape == (3,) and low_res.shape == (3, 256, 256)
    assert torch.equal(predictor.get_image_embedding(), l0.image_embeddings(rgb))
    with pytest.raises(TypeError, match="EfficientViTSam"):
        EfficientViTSamPredictor(torch.nn.Linear(2, 2))


def test_cli_points_per_side_and_segment_options(tmp_path, l0, iconic, capsys):
    """`catalog recognize --segment efficientvit-sam-l0 --checkpoint FILE --points-per-side N`
    runs the automatic mask generator with that grid; unknown options are one-line errors."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

    from catalog.cli import main

    ckpt = tmp_path / "efficientvit_sam_l0.pt"
    torch.save(to_official_state_dict(l0.state_dict()), ckpt)
    d = str(tmp_path / "cat")
    opts = [a for k, v in TINY_CLIP_OPTIONS.items() for a in ("--encoder-option", f"{k}={json.dumps(v)}")]
    assert main(["--catalog", d, "init", "--encoder", TINY_CLIP_SPEC, "--random-init", *opts]) == 0
    assert main(["--catalog", d, "add", str(iconic[0][2]), "--sku", "golden"]) == 0
    capsys.readouterr()
    base = ["--catalog", d, "recognize", str(iconic[0][2]), "--segment", "efficientvit-sam-l0", "--checkpoint", str(ckpt)]
    # random weights: keep every mask, so the count is decided by the 2 x 2 grid and NMS only
    keep_all = ["--segment-option", "pred_iou_thresh=0", "--segment-option", "stability_score_thresh=0"]
    assert main([*base, "--points-per-side", "2", *keep_all, "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)[0]["recognitions"]
    assert 1 <= len(recs) <= 2 * 2 * 3  # at most 3 masks per point prompt
    assert all(r["nearest_sku"] == "golden" for r in recs)
    assert main([*base, "--segment-option", "no_such_option=1"]) == 1
    assert "unknown segmenter option(s) no_such_option" in capsys.readouterr().err
    assert main([*base, "--points-per-side", "0"]) == 1
    assert "points_per_side" in capsys.readouterr().err



@pytest.fixture
def segmenter_table():
    """The segmenter registry table, restored after the test."""
    from retailklip.segment import SEGMENTER_SPECS

    saved = dict(SEGMENTER_SPECS)
    yield SEGMENTER_SPECS
    SEGMENTER_SPECS.clear()
    SEGMENTER_SPECS.update(saved)


def test_registered_segmenter_is_created_by_name(tmp_path, segmenter_table):
    """A new SAM-like model is one registry row; create_model / load_segmenter find it by name,
    load its checkpoint with the row's key map, and unknown-name errors list it."""
    from retailklip.segment import SamSegmenter, SegmenterSpec, register_segmenter

    built = []

    def build():
        built.append(1)
        torch.manual_seed(len(built))
        return build_efficientvit_sam("efficientvit-sam-l0")

    register_segmenter(SegmenterSpec("my-sam", "efficientvit-sam", "my_sam.pt", None, build, official_to_local_key))
    assert list_segmenters()[-2:] == ("whole-image", "my-sam")
    model = create_model("my-sam", random_init=True)
    path = tmp_path / "my_sam.pt"
    torch.save(to_official_state_dict(model.state_dict()), path)
    loaded = create_model("my-sam", checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    seg = load_segmenter("my-sam", checkpoint=path)
    assert isinstance(seg, SamSegmenter) and seg.name == "my-sam" and len(built) == 3
    with pytest.raises(UnknownSegmenterError, match="whole-image, my-sam$"):
        load_segmenter("nope")
    with pytest.raises(ValueError, match="registered already"):
        register_segmenter(segmenter_table["sam-vit-b"])
    del segmenter_table["my-sam"]
    with pytest.raises(UnknownSegmenterError, match="sam-vit-h, whole-image$"):
        load_segmenter("my-sam")


# --- Bit-exactness against the official code (the `efficientsam` package, a test extra) -------------
#
# `efficientsam` is mit-han-lab/efficientvit's EfficientViT-SAM code packaged for pip (model code
# identical to mit-han-lab/efficientvit@de7d7733 apart from import paths; it vendors
# segment_anything as `efficientsam.segment_anything`, so it does not shadow the
# `segment_anything` package our model is built from).

#: Variants compared numerically in the normal suite (the XL ones run the encoder at 1024: slower).
EXACT_VARIANTS = ("efficientvit-sam-l0", "efficientvit-sam-l1")


def _official_zoo():
    from efficientsam import sam_model_zoo  # the test extra; a missing package is a failure, not a skip

    return sam_model_zoo


def _randomize_norm_layers(model: torch.nn.Module, seed: int) -> None:
    """Distinct random statistics and affine parameters for every norm layer: PyTorch's default
    init makes all of them equal, which would hide a key mapping that swaps two of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))
            if not (is_norm or type(module).__name__ == "LayerNorm2d"):
                continue
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def test_official_package_does_not_shadow_segment_anything():
    import segment_anything
    from efficientsam.segment_anything.modeling import MaskDecoder as OfficialMaskDecoder
    from segment_anything.modeling import MaskDecoder

    assert segment_anything.__name__ == "segment_anything" and OfficialMaskDecoder is not MaskDecoder
    assert type(build_efficientvit_sam("efficientvit-sam-l0").mask_decoder) is MaskDecoder


@pytest.mark.parametrize("variant", VARIANTS)
def test_committed_key_lists_are_the_official_models(variant):
    """tests/data/efficientvit_sam/<variant>.json is the official model's (key, shape) list."""
    with torch.device("meta"):
        official = _official_zoo().create_efficientvit_sam_model(variant, pretrained=False)
    expected = json.loads((KEYS_DIR / f"{variant}.json").read_text())
    assert [[k, list(v.shape)] for k, v in official.state_dict().items()] == expected["keys"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_bit_exact_with_the_official_model(tmp_path, variant):
    """An official model with random weights, saved as the official checkpoints are (a raw state
    dict in a .pt file) and loaded by name through our key mapping, gives bit-equal image
    embeddings, mask logits (low-resolution and at the photo's size) and IoU predictions on a
    real GroceryStore photo, for point and box prompts."""
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor as OfficialPredictor

    torch.manual_seed(0)
    official = _official_zoo().create_efficientvit_sam_model(variant, pretrained=False).eval()
    _randomize_norm_layers(official, seed=1)
    ckpt = tmp_path / EFFICIENTVIT_SAM_CONFIGS[variant].checkpoint_file
    torch.save(official.state_dict(), ckpt)
    ours = create_model(variant, checkpoint=ckpt)

    rgb = _photo("train/Fruit/Kiwi/Kiwi_013.jpg")  # 348x464, portrait: padding on the right
    h, w = rgb.shape[:2]
    theirs, mine = OfficialPredictor(official), EfficientViTSamPredictor(ours)
    theirs.set_image(rgb)
    mine.set_image(rgb)
    assert torch.equal(mine.features, theirs.features)
    assert mine.features.abs().max() > 1  # a real embedding, not zeros

    # 3x3 point grid in photo pixels, one point per prompt, three masks each; then two boxes.
    points = torch.tensor([[x * w, y * h] for y in (0.2, 0.5, 0.8) for x in (0.2, 0.5, 0.8)], dtype=torch.float32)
    labels = torch.ones(len(points), 1, dtype=torch.int)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [100.0, 50.0, 200.0, 460.0]])
    for pts, lbl, bxs, multimask in ((points[:, None, :], labels, None, True), (None, None, boxes, False)):
        out_theirs = theirs.predict_torch(
            None if pts is None else theirs.apply_coords_torch(pts), lbl,
            None if bxs is None else theirs.apply_boxes_torch(bxs), multimask_output=multimask, return_logits=True,
        )
        out_mine = mine.predict_torch(
            None if pts is None else mine.transform.apply_coords_torch(pts, (h, w)), lbl,
            None if bxs is None else mine.transform.apply_boxes_torch(bxs, (h, w)),
            multimask_output=multimask, return_logits=True,
        )
        masks, iou, low_res = out_mine
        assert masks.shape == (len(points) if bxs is None else len(boxes), 3 if multimask else 1, h, w)
        assert low_res.shape[-2:] == (256, 256) and iou.shape == masks.shape[:2]
        for a, b in zip(out_mine, out_theirs):
            assert torch.equal(a, b)
        assert masks.std() > 0 and iou.std() > 0  # prompts give different outputs: the comparison can fail


# --- Official weights as users get them: the standard caches, downloaded once ----------------------


def _put_in_hub_cache(hub: Path, repo_id: str, filename: str, state_dict: dict) -> Path:
    """Store ``state_dict`` as ``hf_hub_download`` leaves a file: ``models--OWNER--NAME/snapshots/
    COMMIT/FILE`` with ``refs/main`` naming the commit (huggingface_hub's cache layout)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    torch.save(state_dict, path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or reach a host fails (and is counted)."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_offline_download_error_is_one_line_in_the_cli(tmp_path, iconic):
    """`catalog recognize --segment efficientvit-sam-l0 PHOTO` without --checkpoint, offline and
    with empty caches: exit 1 and ONE stderr line naming the file, the cache looked in and
    --checkpoint FILE."""
    import os
    import subprocess
    import sys

    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

    from catalog.cli import main

    d = str(tmp_path / "cat")
    opts = [a for k, v in TINY_CLIP_OPTIONS.items() for a in ("--encoder-option", f"{k}={json.dumps(v)}")]
    assert main(["--catalog", d, "init", "--encoder", TINY_CLIP_SPEC, "--random-init", *opts]) == 0
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(repo))
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "--catalog", d, "recognize", str(iconic[0][2]),
         "--segment", "efficientvit-sam-l0"],
        check=False, capture_output=True, text=True, env=env, cwd=repo, timeout=300,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("catalog: error: segmenter efficientvit-sam-l0: weights file efficientvit_sam_l0.pt")
    assert str(tmp_path / "hf" / "hub") in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "huggingface.co/mit-han-lab/efficientvit-sam" in lines[0] and "--checkpoint FILE" in lines[0]


def test_offline_sam_checkpoint_names_the_torch_hub_cache(empty_caches):
    from retailklip.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError) as info:
        load_segmenter("sam-vit-b")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("segmenter sam-vit-b: weights file sam_vit_b_01ec64.pth")
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg and "--checkpoint FILE" in msg


def test_cached_official_checkpoint_is_loaded_by_name_without_network(empty_caches, monkeypatch, no_network, iconic, capsys):
    """An official L0 file (the official model's random-init state dict, saved as the official
    files are) in the HF cache where hf_hub_download puts it is found by name, with offline mode
    OFF and every network access refused: load_segmenter and `catalog recognize --segment`."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
    from huggingface_hub import constants

    from catalog.cli import main
    from retailklip.segment import SamSegmenter

    torch.manual_seed(3)
    official = _official_zoo().create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False)
    _randomize_norm_layers(official, seed=4)
    cached = _put_in_hub_cache(Path(constants.HF_HUB_CACHE), "mit-han-lab/efficientvit-sam", "efficientvit_sam_l0.pt",
                               official.state_dict())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seg = load_segmenter("efficientvit-sam-l0")
    assert isinstance(seg, SamSegmenter)
    ours = seg.model.state_dict()
    for k, v in official.state_dict().items():
        assert torch.equal(ours[official_to_local_key(k)], v), k

    d = str(empty_caches / "cat")
    opts = [a for k, v in TINY_CLIP_OPTIONS.items() for a in ("--encoder-option", f"{k}={json.dumps(v)}")]
    assert main(["--catalog", d, "init", "--encoder", TINY_CLIP_SPEC, "--random-init", *opts]) == 0
    assert main(["--catalog", d, "add", str(iconic[0][2]), "--sku", "golden"]) == 0
    capsys.readouterr()
    assert main(["--catalog", d, "recognize", str(iconic[0][2]), "--segment", "efficientvit-sam-l0",
                 "--points-per-side", "1", "--segment-option", "pred_iou_thresh=0",
                 "--segment-option", "stability_score_thresh=0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["recognitions"]
    assert no_network == [] and cached.is_file()


def test_url_checkpoint_cache_and_download_failure(empty_caches, monkeypatch, no_network, segmenter_table, l0):
    """A row with a download URL (as SAM's) uses torch.hub.get_dir()/checkpoints/FILE when it is
    there; otherwise it tries the URL, and a failed download is one line naming the file, the
    cache and --checkpoint FILE, leaving no file behind."""
    from huggingface_hub import constants

    from retailklip.errors import WeightsUnavailableError
    from retailklip.segment import SegmenterSpec, register_segmenter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    register_segmenter(SegmenterSpec(
        "url-sam", "efficientvit-sam", "url_sam.pth", None, partial(build_efficientvit_sam, "efficientvit-sam-l0"),
        official_to_local_key, download_url="https://weights.example.com/sam/url_sam.pth",
    ))
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("url-sam")
    msg = str(info.value)
    assert "\n" not in msg and "weights file url_sam.pth" in msg and str(cache) in msg
    assert "download failed" in msg and "--checkpoint FILE" in msg and no_network
    assert not cache.exists() or not any(cache.iterdir())

    cache.mkdir(parents=True, exist_ok=True)
    torch.save(to_official_state_dict(l0.state_dict()), cache / "url_sam.pth")
    attempts = len(no_network)
    model = create_model("url-sam")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), l0.state_dict().values()))
    assert len(no_network) == attempts


def test_builtin_download_sources():
    from retailklip.segment import SEGMENTER_SPECS

    for name, cfg in EFFICIENTVIT_SAM_CONFIGS.items():
        spec = SEGMENTER_SPECS[name]
        assert spec.hf_repo == "mit-han-lab/efficientvit-sam" and spec.checkpoint_file == cfg.checkpoint_file
        assert spec.checkpoint_file == f"efficientvit_sam_{name.rsplit('-', 1)[1]}.pt"
    for name, file in (("sam-vit-b", "sam_vit_b_01ec64.pth"), ("sam-vit-l", "sam_vit_l_0b3195.pth"),
                       ("sam-vit-h", "sam_vit_h_4b8939.pth")):
        assert SEGMENTER_SPECS[name].download_url == f"https://dl.fbaipublicfiles.com/segment_anything/{file}"
    assert SEGMENTER_SPECS["whole-image"].hf_repo is SEGMENTER_SPECS["whole-image"].download_url is None


# --- The mask decoder with per-image work shared across prompts (retailklip.segment.fast_decoder) ---


def test_fast_decoder_agrees_with_sam_decoder_on_a_real_photo(l0):
    """ImageSharedMaskDecoder gives SAM's mask logits and IoU predictions within 1e-5 for point
    prompts (multimask) and box prompts (single mask) on a real photo; mask prompts (per-prompt
    dense embeddings) take SAM's own path and are bit-equal; weights and state-dict keys are the
    decoder's own."""
    import copy

    from retailklip.segment.fast_decoder import ImageSharedMaskDecoder, use_fast_decoder

    fast_model = use_fast_decoder(copy.deepcopy(l0))
    assert isinstance(fast_model.mask_decoder, ImageSharedMaskDecoder)
    assert use_fast_decoder(fast_model).mask_decoder is fast_model.mask_decoder  # idempotent
    assert list(fast_model.state_dict()) == list(l0.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast_model.state_dict().values(), l0.state_dict().values()))
    with torch.no_grad():  # distinct norm statistics, so a swapped submodule would show
        for i, p in enumerate(fast_model.mask_decoder.parameters()):
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    plain_model = copy.deepcopy(l0)
    plain_model.mask_decoder.load_state_dict(fast_model.mask_decoder.state_dict())

    rgb = _photo("train/Fruit/Orange/Orange_018.jpg")  # 464x348
    h, w = rgb.shape[:2]
    plain, fast = EfficientViTSamPredictor(plain_model), EfficientViTSamPredictor(fast_model)
    plain.set_image(rgb)
    fast.set_image(rgb)
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(24, 1, 2, generator=gen) * torch.tensor([w, h])
    boxes = torch.tensor([[20.0, 10.0, 300.0, 300.0], [200.0, 100.0, 460.0, 340.0], [0.0, 0.0, 463.0, 347.0]])
    cases = [
        (plain.transform.apply_coords_torch(points, (h, w)), torch.ones(24, 1, dtype=torch.int), None, None, True),
        (None, None, plain.transform.apply_boxes_torch(boxes, (h, w)), None, False),
    ]
    for coords, labels, bxs, mask_input, multimask in cases:
        ref = plain.predict_torch(coords, labels, bxs, mask_input, multimask_output=multimask, return_logits=True)
        out = fast.predict_torch(coords, labels, bxs, mask_input, multimask_output=multimask, return_logits=True)
        for a, b in zip(out, ref):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-5
        assert ref[2].std() > 0.01 and ref[1].std() > 0  # outputs vary with the prompt: a real comparison
    # A mask prompt: the dense embedding differs per prompt -> SAM's code path, bit-equal.
    low_res = ref[2]
    ref = plain.predict_torch(None, None, cases[1][2], low_res, multimask_output=False, return_logits=True)
    out = fast.predict_torch(None, None, cases[1][2], low_res, multimask_output=False, return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    with pytest.raises(TypeError, match="MaskDecoder"):
        ImageSharedMaskDecoder(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_fast_decoder_agrees_and_keeps_keys(l0):
    """use_fast_decoder(compile=True): torch.compile in place (state-dict keys unchanged), logits
    within 1e-5 of SAM's decoder on a real photo."""
    import copy

    from retailklip.segment.fast_decoder import use_fast_decoder

    fast_model = use_fast_decoder(copy.deepcopy(l0), compile=True)
    assert list(fast_model.state_dict()) == list(l0.state_dict())
    rgb = _photo("train/Fruit/Kiwi/Kiwi_013.jpg")
    h, w = rgb.shape[:2]
    plain, fast = EfficientViTSamPredictor(l0), EfficientViTSamPredictor(fast_model)
    plain.set_image(rgb)
    fast.set_image(rgb)
    points = torch.rand(8, 1, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([w, h])
    coords, labels = plain.transform.apply_coords_torch(points, (h, w)), torch.ones(8, 1, dtype=torch.int)
    ref = plain.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    out = fast.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    for a, b in zip(out, ref):
        assert (a - b).abs().max() <= 1e-5
    assert ref[2].std() > 0.01
