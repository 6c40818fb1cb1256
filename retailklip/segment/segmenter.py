"""Segmenters: photo in, product :class:`~retailklip.segment.parsing.Segment` list out.

Pipeline of :meth:`SamSegmenter.segment`: decode the photo upright
(``retailklip.images.load_image``, EXIF orientation applied; :meth:`Segmenter.segment_image`
takes a photo decoded already, so a caller that decoded it does not decode it again) ->
automatic mask generation
(:mod:`~retailklip.segment.automatic`) -> retail post-processing
(:mod:`~retailklip.segment.postprocess`) -> segment parsing into RGBA crops
(:mod:`~retailklip.segment.parsing`). :class:`WholeImageSegmenter` returns the photo itself
as the only segment (single-item scans, :func:`~retailklip.segment.parsing.whole_image_segment`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..devices import resolve_device
from ..errors import WeightsError
from ..images import ImageSource, load_image, to_rgb
from .automatic import MaskGeneratorOptions, build_mask_generator
from .errors import SegmenterOptionError
from .modeling.efficientvit_sam import EfficientViTSam
from .parsing import Segment, make_segment, whole_image_segment
from .postprocess import PostprocessOptions, select_masks
from .prompted import PromptedSegmenter, box_segments
from .registry import create_model, get_spec
from .transforms import check_rgb_array

logger = logging.getLogger(__name__)


class Segmenter(ABC):
    """Splits a photo into product segments.

    Attributes:
        name: registry name (see :func:`~retailklip.segment.registry.list_segmenters`).
        postprocess: retail post-processing thresholds.
    """

    name: str
    postprocess: PostprocessOptions

    def segment(self, image: ImageSource, *, boxes: object = None, points: object = None) -> list[Segment]:
        """Segments of a photo: :meth:`segment_image` of the photo decoded upright, or with
        prompts :meth:`segment_prompts` (one segment per box / point).

        Args:
            image: PIL image of any mode, path, bytes, or uint8 array (see
                ``retailklip.images.load_image``); EXIF orientation is applied first, so masks
                and boxes refer to the upright image.
            boxes: float (N, 4) ``(x0, y0, x1, y1)`` pixels of the upright photo, or None.
            points: float (M, 2) ``(x, y)`` pixels, one positive point per object, or None.

        Raises:
            InvalidImageError: the image cannot be decoded or is out of limits.
            SegmenterOptionError: bad prompts, or prompts this segmenter cannot take.
        """
        im = load_image(image)
        if boxes is None and points is None:
            return self.segment_image(im)
        return self.segment_prompts(im, boxes=boxes, points=points)

    def segment_prompts(self, image: Image.Image, *, boxes: object = None, points: object = None) -> list[Segment]:
        """One segment per prompt of a decoded photo; here (no model) each box is its own
        rectangle (:func:`~retailklip.segment.prompted.box_segments`).

        Raises:
            SegmenterOptionError: point prompts (they need a model segmenter), or bad boxes.
        """
        if points is not None and len(np.asarray(points)):
            raise SegmenterOptionError(f"segmenter {self.name} cannot take point prompts; use a model segmenter")
        return box_segments(image, boxes if boxes is not None else [])

    @abstractmethod
    def segment_image(self, image: Image.Image) -> list[Segment]:
        """Segments of a decoded photo: an upright ``RGB``/``RGBA`` PIL image as
        ``retailklip.images.load_image`` returns it (not decoded again); see the subclasses."""

    def image_embeddings(self, rgb: np.ndarray) -> torch.Tensor:
        """SAM image embedding; only model-based segmenters have one.

        Raises:
            TypeError: always here (``whole-image`` has no image encoder).
        """
        raise TypeError(
            f"segmenter {self.name} has no image encoder; use an efficientvit-sam-* or sam-vit-* segmenter"
        )


class SamSegmenter(Segmenter):
    """Segment everything with an EfficientViT-SAM or SAM model, then keep product segments.

    Args:
        name: registry name of the model.
        model: :class:`~retailklip.segment.modeling.EfficientViTSam` or ``segment_anything`` ``Sam``.
        generator_options: automatic mask generation parameters (SAM's defaults).
        postprocess_options: retail post-processing thresholds.

    Attributes:
        model: the model (eval mode).
        generator: the ``SamAutomaticMaskGenerator`` (its ``predictor`` is reusable for prompts).
        prompted: the :class:`~retailklip.segment.prompted.PromptedSegmenter` behind
            :meth:`segment_prompts` (batches of ``points_per_batch`` prompts).

    Calls from several threads are serialised (the generator caches one image at a time).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        generator_options: MaskGeneratorOptions | None = None,
        postprocess_options: PostprocessOptions | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.generator_options = generator_options or MaskGeneratorOptions()
        self.postprocess = postprocess_options or PostprocessOptions()
        self.generator = build_mask_generator(model, self.generator_options)
        self.prompted = PromptedSegmenter(
            model, batch_size=self.generator_options.points_per_batch,
            stability_score_offset=self.generator_options.stability_score_offset,
        )
        # The generator's predictor caches one image's embedding: serialise its users.
        self._lock = threading.Lock()

    @torch.no_grad()
    def image_embeddings(self, rgb: np.ndarray) -> torch.Tensor:
        """SAM image embedding of ``rgb`` with the model's official preprocessing.

        Args:
            rgb: uint8 (H, W, 3) RGB image.

        Returns:
            float32 (1, 256, 64, 64) on the model's device.

        Raises:
            InvalidImageError: ``rgb`` is not a uint8 (H, W, 3) array.
        """
        check_rgb_array(rgb)
        if isinstance(self.model, EfficientViTSam):
            return self.model.image_embeddings(rgb)
        with self._lock:
            predictor = self.generator.predictor
            predictor.set_image(rgb)
            embedding = predictor.get_image_embedding()
            predictor.reset_image()
        return embedding

    def generate(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Raw automatic masks of ``rgb`` (SAM's records, before retail post-processing).

        Args:
            rgb: uint8 (H, W, 3) RGB image.

        Returns:
            ``SamAutomaticMaskGenerator.generate`` records: ``segmentation`` bool (H, W),
            ``predicted_iou``, ``stability_score``, ``bbox`` (XYWH), ``area``, ...

        Raises:
            InvalidImageError: ``rgb`` is not a uint8 (H, W, 3) array.
        """
        check_rgb_array(rgb)
        with self._lock:
            return self.generator.generate(rgb)

    def segment_image(self, image: Image.Image) -> list[Segment]:
        """Product segments of a decoded photo (:meth:`segment` decodes one first).

        Args:
            image: upright PIL ``RGB``/``RGBA`` image as ``retailklip.images.load_image``
                returns it. Transparent pixels are composited onto grey for the model; crops
                keep the original colours.

        Returns:
            Segments sorted by descending score (ties: larger area first); empty if nothing
            passes the filters (unless ``postprocess.fallback_whole_image``).
        """
        start = time.perf_counter()
        records = self.generate(np.asarray(to_rgb(image)))
        segments = self.segments_from_records(image, records)
        logger.info(
            "%s: %d masks -> %d segments in %.2f s (%dx%d image)",
            self.name, len(records), len(segments), time.perf_counter() - start, image.width, image.height,
        )
        return segments

    def segment_prompts(self, image: Image.Image, *, boxes: object = None, points: object = None) -> list[Segment]:
        """One segment per box / point of a decoded photo, in prompt order (boxes, then points),
        no post-processing: :meth:`PromptedSegmenter.segment_image
        <retailklip.segment.prompted.PromptedSegmenter.segment_image>`.

        Raises:
            SegmenterOptionError: no prompts or bad prompts.
        """
        return self.prompted.segment_image(image, boxes=boxes, points=points)

    def segments_from_records(self, image: Image.Image, records: list[dict[str, Any]]) -> list[Segment]:
        """Retail post-processing and parsing of automatic-mask records of ``image``.

        Args:
            image: the upright PIL ``RGB``/``RGBA`` image the records were generated from
                (as returned by ``retailklip.images.load_image``).
            records: output of :meth:`generate` on that image.

        Returns:
            Segments as :meth:`segment` returns them.

        Raises:
            ValueError: a record's mask does not match the image size.
        """
        return segments_from_records(image, records, self.postprocess)


class WholeImageSegmenter(Segmenter):
    """One segment = the whole photo (mask all True, score 1.0), for single-item scans.

    Args:
        postprocess_options: kept for a uniform interface; no rule applies to the whole image.
    """

    def __init__(self, postprocess_options: PostprocessOptions | None = None) -> None:
        self.name = "whole-image"
        self.postprocess = postprocess_options or PostprocessOptions()

    def segment_image(self, image: Image.Image) -> list[Segment]:
        """``[Segment]`` covering the decoded (upright ``RGB``/``RGBA``) photo; the crop is the
        photo as RGBA (:func:`~retailklip.segment.parsing.whole_image_segment`)."""
        return [whole_image_segment(image)]


def load_segmenter(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    random_init: bool = False,
    generator_options: MaskGeneratorOptions | None = None,
    postprocess_options: PostprocessOptions | None = None,
) -> Segmenter:
    """Create a segmenter by name.

    Args:
        name: one of :func:`~retailklip.segment.registry.list_segmenters`: ``efficientvit-sam-l0``,
            ``-l1``, ``-l2``, ``-xl0``, ``-xl1``, ``sam-vit-b``, ``sam-vit-l``, ``sam-vit-h``, ``whole-image``,
            or a name added with :func:`~retailklip.segment.registry.register_segmenter`.
        checkpoint: local weights file; None: the official file from the standard cache,
            downloaded into it once (Hugging Face hub for EfficientViT-SAM, SAM's published URL
            into torch's hub cache; :func:`~retailklip.segment.registry.official_checkpoint`);
            must be None for ``whole-image``.
        device: torch device for the model.
        random_init: random weights (tests/benchmarks only; masks are meaningless).
        generator_options: automatic mask generation parameters.
        postprocess_options: retail post-processing thresholds.

    Returns:
        A :class:`SamSegmenter` or :class:`WholeImageSegmenter`.

    Raises:
        UnknownSegmenterError: unknown name (the message lists the registered ones).
        WeightsError: missing/wrong checkpoint (message names the expected file and ``--checkpoint``),
            the official one neither cached nor downloadable (``WeightsUnavailableError``, one
            line), or a checkpoint given to ``whole-image``.
        SegmenterOptionError: ``checkpoint`` together with ``random_init``, or an unusable device.
    """
    spec = get_spec(name)
    if spec.build_model is None:
        if checkpoint is not None:
            raise WeightsError("segmenter whole-image uses no weights; drop --checkpoint or choose a model segmenter")
        resolve_device(device, error=SegmenterOptionError)
        return WholeImageSegmenter(postprocess_options)
    model = create_model(name, checkpoint, random_init=random_init, device=device)
    return SamSegmenter(name, model, generator_options, postprocess_options)


def segments_from_records(image: Image.Image, records: list[dict[str, Any]], postprocess: PostprocessOptions
                          ) -> list[Segment]:
    """Retail post-processing (:func:`~retailklip.segment.postprocess.select_masks`) and parsing
    of automatic-mask records of ``image`` (any generator's, or a simulation's): segments sorted
    by descending predicted IoU (ties: larger area first); the whole image when none is left and
    ``postprocess.fallback_whole_image``.

    Raises:
        ValueError: a record's mask does not match the image size.
    """
    masks = [r["segmentation"] for r in records]
    scores = [float(r["predicted_iou"]) for r in records]
    keep = select_masks(masks, postprocess, scores)
    keep.sort(key=lambda i: (-scores[i], -int(np.count_nonzero(masks[i])), i))
    segments = [make_segment(image, masks[i], scores[i], float(records[i]["stability_score"])) for i in keep]
    if not segments and postprocess.fallback_whole_image:
        segments = [whole_image_segment(image)]
    return segments
