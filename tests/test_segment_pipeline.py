"""End-to-end segmentation with random weights: shapes, crop contract, EXIF, backends, errors.

Random weights make the masks meaningless but exercise every code path at real cost; a 4x4
point grid and the L0 variant keep the run short on 2 CPU cores.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from retailklip.errors import InvalidImageError
from retailklip.segment import (
    MaskGeneratorOptions,
    PostprocessOptions,
    SamSegmenter,
    Segment,
    WholeImageSegmenter,
    load_segmenter,
    save_segments,
    select_masks,
)

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store" / "dataset"
PORTRAIT = "train/Fruit/Kiwi/Kiwi_013.jpg"  # 348x464 (W x H)
# Keep every mask SAM returns (after its own NMS), so the crop contract is checked on all of them.
KEEP_ALL = PostprocessOptions(min_area_fraction=0.0, max_area_fraction=1.0, containment_threshold=2.0)
GRID = MaskGeneratorOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, mode="sam")


def _photo(rel: str) -> Image.Image:
    path = GROCERY / rel
    if not path.is_file():
        raise FileNotFoundError(f"test data missing: {path} (expected ../shared beside the repository)")
    return Image.open(path)


def _check_segment(seg: Segment, image: Image.Image) -> None:
    rgb = np.asarray(image.convert("RGB"))
    assert isinstance(seg.mask, np.ndarray) and seg.mask.dtype == bool
    assert seg.mask.shape == (image.height, image.width)
    x0, y0, x1, y1 = seg.bbox
    assert all(isinstance(v, int) for v in seg.bbox)
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    # Tight, exclusive box: the mask touches every side of it and nothing lies outside.
    assert seg.mask[y0:y1, x0:x1].sum() == seg.mask.sum() > 0
    assert seg.mask[y0, x0:x1].any() and seg.mask[y1 - 1, x0:x1].any()
    assert seg.mask[y0:y1, x0].any() and seg.mask[y0:y1, x1 - 1].any()
    assert isinstance(seg.score, float)
    assert seg.crop.mode == "RGBA" and seg.crop.size == (x1 - x0, y1 - y0)
    crop = np.asarray(seg.crop)
    inside = seg.mask[y0:y1, x0:x1]
    assert (crop[..., 3][~inside] == 0).all()
    assert (crop[..., 3][inside] == 255).all()
    assert np.array_equal(crop[..., :3][inside], rgb[y0:y1, x0:x1][inside])


@pytest.fixture(scope="module")
def l0_keep_all() -> SamSegmenter:
    torch.manual_seed(0)
    seg = load_segmenter("efficientvit-sam-l0", random_init=True, generator_options=GRID, postprocess_options=KEEP_ALL)
    assert isinstance(seg, SamSegmenter)
    return seg


@pytest.fixture(scope="module")
def portrait_run(l0_keep_all):
    """One end-to-end ``segment`` call; the generator's raw records are captured on the way."""
    image = _photo(PORTRAIT)
    captured = []
    generate = l0_keep_all.generator.generate
    l0_keep_all.generator.generate = lambda rgb: captured.append(generate(rgb)) or captured[-1]
    try:
        segments = l0_keep_all.segment(image)
    finally:
        l0_keep_all.generator.generate = generate
    (records,) = captured
    return image, records, segments


def test_image_embeddings_contract(l0_keep_all):
    rgb = np.asarray(_photo(PORTRAIT).convert("RGB"))
    emb = l0_keep_all.image_embeddings(rgb)
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()


def test_segment_everything_shapes_and_crops(portrait_run):
    image, records, segments = portrait_run
    assert image.size == (348, 464)
    assert records, "a 4x4 grid with zero thresholds must yield masks"
    assert len(segments) == len([r for r in records if r["area"] > 0])
    for seg in segments:
        _check_segment(seg, image)
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)
    # The segments are the generator's masks, unchanged.
    raw = {r["segmentation"].tobytes() for r in records}
    assert all(seg.mask.tobytes() in raw for seg in segments)


def test_default_postprocessing_applies_the_rules(l0_keep_all, portrait_run):
    image, records, _ = portrait_run
    options = PostprocessOptions()
    strict = SamSegmenter("efficientvit-sam-l0", l0_keep_all.model, GRID, options)
    segments = strict.segments_from_records(image.convert("RGB"), records)
    keep = select_masks([r["segmentation"] for r in records], options, [r["predicted_iou"] for r in records])
    assert sorted(s.mask.tobytes() for s in segments) == sorted(records[i]["segmentation"].tobytes() for i in keep)
    area = image.width * image.height
    for seg in segments:
        assert options.min_area_fraction * area <= seg.area <= options.max_area_fraction * area


def test_fallback_to_whole_image(l0_keep_all, portrait_run):
    image, records, _ = portrait_run
    image = image.convert("RGB")
    nothing = PostprocessOptions(min_area_fraction=1.0, max_area_fraction=1.0)  # drops every mask
    empty = SamSegmenter("efficientvit-sam-l0", l0_keep_all.model, GRID, nothing)
    assert empty.segments_from_records(image, records) == []
    fallback = SamSegmenter(
        "efficientvit-sam-l0", l0_keep_all.model, GRID,
        PostprocessOptions(min_area_fraction=1.0, max_area_fraction=1.0, fallback_whole_image=True),
    )
    (seg,) = fallback.segments_from_records(image, records)
    assert seg.bbox == (0, 0, 348, 464) and seg.mask.all()


def test_exif_orientation_is_applied():
    upright = _photo(PORTRAIT).convert("RGB")
    # Store the photo rotated with an EXIF tag saying "rotate 90 CW to display" (orientation 6).
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    rotated = Image.open(io.BytesIO(buf.getvalue()))
    assert rotated.size == (464, 348)
    (seg,) = load_segmenter("whole-image").segment(rotated)
    assert seg.mask.shape == (464, 348) and seg.bbox == (0, 0, 348, 464)
    expected = np.asarray(ImageOps.exif_transpose(rotated).convert("RGB"))
    assert np.array_equal(expected, np.asarray(upright))
    assert np.array_equal(np.asarray(seg.crop)[..., :3], expected)


def test_whole_image_backend(tmp_path):
    seg_ = load_segmenter("whole-image")
    assert isinstance(seg_, WholeImageSegmenter)
    image = _photo("val/Fruit/Banana/Banana_001.jpg")
    (seg,) = seg_.segment(image)
    _check_segment(seg, image)
    assert seg.mask.all() and seg.score == 1.0 and (np.asarray(seg.crop)[..., 3] == 255).all()
    paths = save_segments([seg], tmp_path, "Banana_001.jpg")
    assert [p.name for p in paths] == ["Banana_001_segment_0.png"]
    with pytest.raises(TypeError, match="no image encoder"):
        seg_.image_embeddings(np.asarray(image))


def test_any_pil_mode_is_accepted():
    image = _photo("val/Fruit/Banana/Banana_001.jpg")
    whole = load_segmenter("whole-image")
    for mode in ("L", "P", "CMYK", "RGBA", "I;16"):
        if mode == "I;16":
            converted = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
            assert converted.mode == "I;16"
        else:
            converted = image.convert(mode)
        (seg,) = whole.segment(converted)
        assert seg.crop.mode == "RGBA" and seg.mask.shape == (348, 348)


def test_bad_images_raise_invalid_image_error(l0_keep_all, tmp_path):
    text = tmp_path / "fake.jpg"
    text.write_text("not an image")
    for bad in (tmp_path / "missing.jpg", text, b"", b"\x89PNG garbage", tmp_path):
        with pytest.raises(InvalidImageError):
            l0_keep_all.segment(bad)
        with pytest.raises(InvalidImageError):
            load_segmenter("whole-image").segment(bad)
    with pytest.raises(InvalidImageError):
        l0_keep_all.generate(np.zeros((5, 5), np.uint8))


def test_sam_vit_backend_builds_with_segment_anything():
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    from segment_anything.modeling import Sam

    torch.manual_seed(0)
    seg = load_segmenter("sam-vit-b", random_init=True, generator_options=GRID)
    assert isinstance(seg.model, Sam) and not seg.model.training
    assert type(seg.generator) is SamAutomaticMaskGenerator and type(seg.generator.predictor) is SamPredictor
    assert seg.generator.point_grids[0].shape == (16, 2)
