"""The recognise path decodes the photo once: the recognizer decodes it
(``retailklip.images.load_image``); the segmenter and the encoder get decoded images."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from retailklip import Recognizer, images


@pytest.fixture
def load_image_calls(monkeypatch):
    """Every ``load_image`` a retailklip module holds, replaced by one that records its source."""
    import retailklip.encoders.base  # noqa: F401 - bind their load_image before patching
    import retailklip.segment.segmenter  # noqa: F401

    calls, real = [], images.load_image

    def counting(source, *args, **kwargs):
        calls.append(source)
        return real(source, *args, **kwargs)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("retailklip") and getattr(mod, "load_image", None) is real:
            monkeypatch.setattr(mod, "load_image", counting)
    return calls


@pytest.mark.parametrize("segmenter", [None, "whole-image", "efficientvit-sam-l0"])
def test_recognize_decodes_the_file_once(tiny_catalog, iconic, val_photos, load_image_calls, segmenter):
    import torch

    from retailklip.segment import MaskGeneratorOptions, PostprocessOptions, load_segmenter

    tiny_catalog.add(iconic[0][2], sku="a")
    seg = None
    if segmenter == "efficientvit-sam-l0":
        torch.manual_seed(0)
        seg = load_segmenter(segmenter, random_init=True,
                             generator_options=MaskGeneratorOptions(points_per_side=4, pred_iou_thresh=0.0,
                                                                    stability_score_thresh=0.0),
                             postprocess_options=PostprocessOptions(fallback_whole_image=True))
    elif segmenter:
        seg = load_segmenter(segmenter)
    rec = Recognizer(tiny_catalog, segmenter=seg)
    photo = val_photos[0][0]
    load_image_calls.clear()
    recs = rec.recognize(photo)
    assert recs and load_image_calls == [photo]


def test_no_segmenter_and_whole_image_segmenter_embed_the_same_crop(tiny_catalog, iconic, val_photos):
    from retailklip.segment import load_segmenter

    tiny_catalog.add(iconic[0][2], sku="a")
    photo = val_photos[0][0]
    (plain,) = Recognizer(tiny_catalog, threshold=2.0).recognize(photo)
    (whole,) = Recognizer(tiny_catalog, threshold=2.0, segmenter=load_segmenter("whole-image")).recognize(photo)
    assert plain.mask is None and whole.mask is not None and whole.mask.all()
    assert (plain.bbox, plain.score, plain.distance) == (whole.bbox, whole.score, whole.distance)
    assert np.array_equal(np.float32(plain.distance), np.float32(whole.distance))
