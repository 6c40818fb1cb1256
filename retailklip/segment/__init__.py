"""Segmentation stage: split a store photo into product segments and parse them into RGBA crops.

Public API::

    from retailklip.segment import load_segmenter, save_segments, Segment, list_segmenters

    seg = load_segmenter("efficientvit-sam-l0", checkpoint="efficientvit_sam_l0.pt", device="cpu")
    emb = seg.image_embeddings(rgb)        # uint8 (H, W, 3) -> float32 (1, 256, 64, 64)
    segments = seg.segment(image)          # PIL image / path / array -> list[Segment]
    save_segments(segments, "out/", "shelf.jpg")   # out/shelf_segment_0.png, ...

See ``docs/segmentation.md`` for the models, the compatibility proof with the official
EfficientViT-SAM checkpoints, the post-processing rules and the benchmarks.
"""

from .automatic import EfficientViTSamAutomaticMaskGenerator, MaskGeneratorOptions, build_mask_generator
from .checkpoint import local_to_official_key, official_to_local_key, to_official_state_dict
from .errors import SegmenterOptionError, UnknownSegmenterError
from .modeling import EFFICIENTVIT_SAM_CONFIGS, EfficientViTSam, build_efficientvit_sam
from .parsing import Segment, crop_segment, make_segment, mask_to_bbox, save_segments, segment_filename
from .postprocess import PostprocessOptions, select_masks
from .predictor import EfficientViTSamPredictor
from .registry import SEGMENTER_SPECS, SegmenterSpec, create_model, list_segmenters, register_segmenter
from .segmenter import SamSegmenter, Segmenter, WholeImageSegmenter, load_segmenter

__all__ = [
    "EFFICIENTVIT_SAM_CONFIGS",
    "SEGMENTER_SPECS",
    "EfficientViTSam",
    "EfficientViTSamAutomaticMaskGenerator",
    "EfficientViTSamPredictor",
    "MaskGeneratorOptions",
    "PostprocessOptions",
    "SamSegmenter",
    "Segment",
    "Segmenter",
    "SegmenterOptionError",
    "SegmenterSpec",
    "UnknownSegmenterError",
    "WholeImageSegmenter",
    "build_efficientvit_sam",
    "build_mask_generator",
    "create_model",
    "crop_segment",
    "list_segmenters",
    "load_segmenter",
    "local_to_official_key",
    "make_segment",
    "mask_to_bbox",
    "official_to_local_key",
    "register_segmenter",
    "save_segments",
    "segment_filename",
    "select_masks",
    "to_official_state_dict",
]
