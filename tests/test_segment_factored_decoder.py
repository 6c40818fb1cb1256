"""The factored mask decoder (retailklip.segment.factored_decoder): SAM's mask logits and IoU
predictions on a real photo, as accurate as SAM's own float32 decoder against a float64
reference (also with weights scaled to trained-model activation sizes), the cropped upscaling,
the per-image cache, SAM's path for mask prompts, and the generator's ``runtime="factored"``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from realphotos import grocery_rgb
from samdecoder import prompt_embeddings

from retailklip.segment import MaskGeneratorOptions, SegmenterOptionError, build_mask_generator
from retailklip.segment.factored_decoder import FactoredMaskDecoder
from retailklip.segment.fast_decoder import ImageSharedMaskDecoder


def _cases(predictor):
    h, w = predictor.original_size
    gen = torch.Generator().manual_seed(0)
    return [  # (sparse, dense), multimask: 1-point prompts, 2-point prompts (T = 8), boxes
        (prompt_embeddings(predictor, points=torch.rand(12, 1, 2, generator=gen) * torch.tensor([w, h])), True),
        (prompt_embeddings(predictor, points=torch.rand(5, 2, 2, generator=gen) * torch.tensor([w, h])), True),
        (prompt_embeddings(predictor, boxes=torch.tensor([[20.0, 10.0, 300.0, 300.0], [200.0, 100.0, 460.0, 340.0],
                                                 [0.0, 0.0, 463.0, 347.0]])), False),
    ]


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_factored_decoder_is_as_accurate_as_sams_float32(sam_l0, sam_orange, scale):
    """Against SAM's MaskDecoder in float64, the factored decoder's float32 error is within 2x
    SAM's own float32 error (plus 1e-6 of the output's scale): the same arithmetic up to
    rounding. ``scale`` multiplies every weight matrix: x8 gives logits of ~1000 and IoU
    predictions of ~70, activation sizes of a trained model rather than random init."""
    decoder = copy.deepcopy(sam_l0.mask_decoder)
    for p in decoder.parameters():
        if p.ndim > 1:
            p.mul_(scale)
    reference = copy.deepcopy(decoder).double()
    factored = FactoredMaskDecoder(decoder)
    pe = sam_l0.prompt_encoder.get_dense_pe()
    for (sparse, dense), multimask in _cases(sam_orange):
        exact = reference(sam_orange.features.double(), pe.double(), sparse.double(), dense.double(), multimask)
        sam = decoder(sam_orange.features, pe, sparse, dense, multimask)
        ours = factored(sam_orange.features, pe, sparse, dense, multimask)
        for a, b, x in zip(ours, sam, exact):
            assert a.shape == b.shape and a.dtype == torch.float32
            floor = 1e-6 * x.abs().max().item()
            assert (a.double() - x).abs().max() <= 2 * (b.double() - x).abs().max() + floor
            assert (a - b).abs().max() <= 1e-5 * max(1.0, x.abs().max().item())
        assert sam[0].std() > 0.01 * scale and sam[1].std() > 0  # outputs vary with the prompt: a real comparison
        assert ((ours[0] > 0) != (sam[0] > 0)).float().mean() < 1e-4  # binary masks: at most a few pixels at 0


@torch.no_grad()
def test_cropped_upscaling_is_the_crop_and_mask_prompts_take_sams_path(sam_l0, sam_orange):
    """``predict(size=...)`` gives the top-left crop of the full masks (only those tokens are
    upscaled); a mask prompt (per-prompt dense embeddings) runs SAM's decoder bit-for-bit; a
    size outside the frame and a non-decoder are one-line errors."""
    factored = FactoredMaskDecoder(sam_l0.mask_decoder)
    pe = sam_l0.prompt_encoder.get_dense_pe()
    (sparse, dense), _ = _cases(sam_orange)[0]
    full, iou = factored(sam_orange.features, pe, sparse, dense, True)
    for size in [(192, 256), (87, 130), (1, 1), (256, 256)]:
        crop, iou_crop = factored.predict(sam_orange.features, pe, sparse, dense, True, size=size)
        assert crop.shape == (12, 3, *size)
        torch.testing.assert_close(crop, full[..., : size[0], : size[1]], rtol=0, atol=1e-6)
        assert torch.equal(iou_crop, iou)
    single, iou1 = factored(sam_orange.features, pe, sparse, dense, False)
    assert single.shape == (12, 1, 256, 256) and iou1.shape == (12, 1)
    (box_sparse, box_dense), _ = _cases(sam_orange)[2]
    _, mask_dense = sam_l0.prompt_encoder(points=None, boxes=None, masks=torch.randn(3, 1, 256, 256))
    ref = sam_l0.mask_decoder(sam_orange.features, pe, box_sparse, mask_dense, False)
    out = factored(sam_orange.features, pe, box_sparse, mask_dense, False)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert factored(sam_orange.features, pe, sparse[:0], dense[:0], True)[0].shape == (0, 3, 256, 256)
    with pytest.raises(ValueError, match="within the 256x256 mask frame"):
        factored.predict(sam_orange.features, pe, sparse, dense, True, size=(300, 10))
    with pytest.raises(TypeError, match="MaskDecoder"):
        FactoredMaskDecoder(torch.nn.Linear(2, 2))
    wrapped = FactoredMaskDecoder(ImageSharedMaskDecoder(sam_l0.mask_decoder))  # unwraps the shared decoder
    assert wrapped.plain is sam_l0.mask_decoder
    assert list(wrapped.state_dict()) == list(sam_l0.mask_decoder.state_dict())


@torch.no_grad()
def test_per_image_terms_are_computed_once_per_image(sam_l0, sam_orange, monkeypatch):
    """The prompt encoder makes new PE and dense tensors on every call: the cache compares
    values, so a photo's batches compute the per-image terms once, and a new image (or an
    image embedding changed in place) recomputes them."""
    factored = FactoredMaskDecoder(sam_l0.mask_decoder)
    calls = []
    real = factored._image_terms
    monkeypatch.setattr(factored, "_image_terms", lambda *a: calls.append(1) or real(*a))
    for (sparse, dense), multimask in _cases(sam_orange):
        factored(sam_orange.features, sam_l0.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    assert len(calls) == 1
    other = sam_orange.features.clone()
    other[0, 0, 0, 0] += 1.0
    (sparse, dense), _ = _cases(sam_orange)[0]
    factored(other, sam_l0.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert len(calls) == 2
    other.mul_(2.0)  # in place: the same tensor, other values
    factored(other, sam_l0.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert len(calls) == 3


def test_generator_runtime_factored_gives_the_torch_runtimes_records(sam_l0):
    """Automatic mask generation with ``runtime="factored"`` (every mask kept) on a real photo
    gives the records of the torch runtime: scores within 1e-5, masks differ in <= 0.1 % of their
    pixels; the option is validated."""
    rgb = grocery_rgb("train/Packages/Oatghurt/Oatly-Natural-Oatghurt/Oatly-Natural-Oatghurt_004.jpg")
    opts = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, "max_prompts": 32, "max_masks": 200}
    records = {}
    for name in ("factored", "torch"):
        gen = build_mask_generator(sam_l0, MaskGeneratorOptions(runtime=name, **opts))
        assert isinstance(gen.mask_decoder, FactoredMaskDecoder) == (name == "factored")
        records[name] = gen.generate(rgb)
        assert gen.prompts_used == 32
    a, b = records["factored"], records["torch"]
    assert len(a) == len(b) >= 32
    for x, y in zip(a, b):
        assert abs(x["predicted_iou"] - y["predicted_iou"]) <= 1e-5
        assert abs(x["stability_score"] - y["stability_score"]) <= 1e-4
        assert np.count_nonzero(x["segmentation"] != y["segmentation"]) <= 0.001 * x["segmentation"].size
    with pytest.raises(SegmenterOptionError, match="runtime must be one of auto, factored, onnxruntime, torch"):
        MaskGeneratorOptions(runtime="tensorrt")
