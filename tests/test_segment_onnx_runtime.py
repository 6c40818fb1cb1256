"""ONNX Runtime for fast mode (retailklip.segment.onnx_runtime): the mask decoder's logits
within the exact-mode tolerance of SAM's on a real photo, the torch path for what it does not
take, the on-disk graph cache, the agreement check, and the runtime option of the generator."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from realphotos import grocery_rgb
from samdecoder import prompt_embeddings

from retailklip.segment import (
    MaskGeneratorOptions,
    SegmenterOptionError,
    build_mask_generator,
    onnx_runtime,
)
from retailklip.segment import automatic as automatic_module
from retailklip.segment.factored_decoder import FactoredMaskDecoder
from retailklip.segment.fast_decoder import ImageSharedMaskDecoder
from retailklip.segment.onnx_runtime import OnnxMaskDecoder, onnxruntime_available

# onnxruntime and onnx are in the test extra: CI must run these, not skip them.
assert onnxruntime_available(), "pip install -e '.[test]' installs onnxruntime and onnx"


_photo = grocery_rgb


@torch.no_grad()
def test_onnx_mask_decoder_agrees_with_sam_decoder_on_a_real_photo(sam_l0, sam_orange, tmp_path):
    """24 point prompts (multimask, 3 outputs), 2-point prompts and 3 box prompts (single
    mask): mask logits and IoU predictions within 1e-5 of SAM's own MaskDecoder; empty batch and
    a mask prompt go to the torch decoder."""
    decoder = OnnxMaskDecoder(sam_l0.mask_decoder, cache_dir=tmp_path)
    assert decoder.active is None  # nothing exported before the first call
    h, w = sam_orange.original_size
    gen = torch.Generator().manual_seed(0)
    pe = sam_l0.prompt_encoder.get_dense_pe()
    cases = [
        (prompt_embeddings(sam_orange, points=torch.rand(24, 1, 2, generator=gen) * torch.tensor([w, h])), True),
        (prompt_embeddings(sam_orange, points=torch.rand(5, 2, 2, generator=gen) * torch.tensor([w, h])), True),
        (prompt_embeddings(sam_orange, boxes=torch.tensor([[20.0, 10.0, 300.0, 300.0], [200.0, 100.0, 460.0, 340.0],
                                                       [0.0, 0.0, 463.0, 347.0]])), False),
    ]
    for (sparse, dense), multimask in cases:
        ref = sam_l0.mask_decoder(sam_orange.features, pe, sparse, dense, multimask)
        out = decoder(sam_orange.features, pe, sparse, dense, multimask)
        assert decoder.active is True
        for a, b in zip(out, ref):
            assert a.shape == b.shape and a.dtype == torch.float32
            assert (a - b).abs().max() <= 1e-5
        assert ref[0].std() > 0.01 and ref[1].std() > 0  # outputs vary with the prompt: a real comparison
    # A mask prompt (per-prompt dense embedding): the torch decoder's path, bit-equal to it.
    sparse, _ = cases[2][0]
    _, dense = sam_l0.prompt_encoder(points=None, boxes=None, masks=torch.randn(3, 1, 256, 256, generator=gen))
    ref = decoder.fallback(sam_orange.features, pe, sparse, dense, False)
    out = decoder(sam_orange.features, pe, sparse, dense, False)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert decoder(sam_orange.features, pe, sparse[:0], cases[2][0][1], False)[0].shape[0] == 0
    with pytest.raises(TypeError, match="MaskDecoder"):
        OnnxMaskDecoder(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_graph_cache_is_reused_and_survives_damage(sam_l0, sam_orange, tmp_path, monkeypatch, caplog):
    """The exported graph is cached under the weights' digest: a second decoder loads it
    without exporting; a damaged file is exported again; other weights get another file."""
    pe = sam_l0.prompt_encoder.get_dense_pe()
    sparse, dense = prompt_embeddings(sam_orange, points=torch.tensor([[[100.0, 100.0]], [[300.0, 200.0]]]))
    first = OnnxMaskDecoder(sam_l0.mask_decoder, cache_dir=tmp_path)
    ref = first(sam_orange.features, pe, sparse, dense, True)
    files = list(tmp_path.glob("mask-decoder-*.onnx"))
    assert len(files) == 1 and files[0].stat().st_size > 1_000_000

    def no_export(decoder):
        raise AssertionError("exported although cached")

    monkeypatch.setattr(onnx_runtime, "export_decoder", no_export)
    second = OnnxMaskDecoder(sam_l0.mask_decoder, cache_dir=tmp_path)
    out = second(sam_orange.features, pe, sparse, dense, True)
    assert second.active is True and all(torch.equal(a, b) for a, b in zip(out, ref))
    monkeypatch.undo()

    files[0].write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="retailklip.segment.onnx_runtime"):
        third = OnnxMaskDecoder(sam_l0.mask_decoder, cache_dir=tmp_path)
        out = third(sam_orange.features, pe, sparse, dense, True)
    assert third.active is True and "unreadable cached mask-decoder graph" in caplog.text
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(out, ref))
    assert files[0].stat().st_size > 1_000_000  # re-cached

    other = copy.deepcopy(sam_l0.mask_decoder)
    with torch.no_grad():
        other.iou_token.weight.add_(1.0)
    OnnxMaskDecoder(other, cache_dir=tmp_path)(sam_orange.features, pe, sparse, dense, True)
    assert len(list(tmp_path.glob("mask-decoder-*.onnx"))) == 2


@torch.no_grad()
def test_a_graph_that_disagrees_is_not_used(sam_l0, sam_orange, tmp_path, monkeypatch, caplog):
    """A freshly exported graph is checked against the torch decoder: outside TOLERANCE it is
    neither used nor cached, and the call is the torch decoder's."""
    monkeypatch.setattr(onnx_runtime, "TOLERANCE", -1.0)  # no graph can pass
    pe = sam_l0.prompt_encoder.get_dense_pe()
    sparse, dense = prompt_embeddings(sam_orange, points=torch.tensor([[[100.0, 100.0]]]))
    decoder = OnnxMaskDecoder(sam_l0.mask_decoder, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="retailklip.segment.onnx_runtime"):
        out = decoder(sam_orange.features, pe, sparse, dense, True)
    assert decoder.active is False and "differs from torch" in caplog.text
    assert not list(tmp_path.glob("*.onnx"))
    ref = decoder.fallback(sam_orange.features, pe, sparse, dense, True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_runtime_option_of_the_mask_generator(sam_l0, monkeypatch):
    """fast mode: auto -> the factored decoder, ONNX Runtime's or the image-shared torch decoder
    on request; exact mode keeps SAM's decoder; an unknown name or onnxruntime without it
    installed is a one-line error."""
    assert MaskGeneratorOptions().runtime == "auto"
    assert isinstance(build_mask_generator(sam_l0).mask_decoder, FactoredMaskDecoder)
    assert isinstance(build_mask_generator(sam_l0, MaskGeneratorOptions(runtime="onnxruntime")).mask_decoder, OnnxMaskDecoder)
    assert type(build_mask_generator(sam_l0, MaskGeneratorOptions(runtime="torch")).mask_decoder) is ImageSharedMaskDecoder
    assert build_mask_generator(sam_l0, MaskGeneratorOptions(mode="exact")).mask_decoder is None
    with pytest.raises(SegmenterOptionError, match="runtime must be one of auto, factored, onnxruntime, torch"):
        MaskGeneratorOptions(runtime="tensorrt")
    monkeypatch.setattr(automatic_module, "onnxruntime_available", lambda: False)
    with pytest.raises(SegmenterOptionError, match=r"pip install 'retailklip\[onnx\]'"):
        MaskGeneratorOptions(runtime="onnxruntime")
    assert isinstance(build_mask_generator(sam_l0).mask_decoder, FactoredMaskDecoder)  # auto needs no onnxruntime


@pytest.mark.slow
def test_generator_masks_equal_with_either_decoder(sam_l0):
    """Automatic mask generation (fast mode, every mask kept) on a real photo gives the same
    records with ONNX Runtime as with torch: scores within 1e-5, masks differ in <= 0.1 % of
    their pixels (logits within 1e-5, so only pixels at the threshold can flip)."""
    rgb = _photo("train/Packages/Oatghurt/Oatly-Natural-Oatghurt/Oatly-Natural-Oatghurt_004.jpg")
    opts = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, "max_prompts": 32, "max_masks": 200}
    records = {}
    for name in ("onnxruntime", "torch"):
        gen = build_mask_generator(sam_l0, MaskGeneratorOptions(runtime=name, **opts))
        records[name] = gen.generate(rgb)
        assert gen.prompts_used == 32
    a, b = records["onnxruntime"], records["torch"]
    assert len(a) == len(b) >= 32
    for x, y in zip(a, b):
        assert abs(x["predicted_iou"] - y["predicted_iou"]) <= 1e-5
        assert abs(x["stability_score"] - y["stability_score"]) <= 1e-4
        assert np.count_nonzero(x["segmentation"] != y["segmentation"]) <= 0.001 * x["segmentation"].size
