"""EfficientViT-SAM: an EfficientViT image encoder in front of SAM's prompt encoder and mask decoder.

Source: Zhang et al., "EfficientViT-SAM: Accelerated Segment Anything Model Without Accuracy
Loss" (2024), section 3; variants L0/L1/L2 run the encoder at 512x512, XL0/XL1 at 1024x1024.
The prompt encoder, the two-way transformer and the mask decoder are SAM's (Kirillov et al.,
"Segment Anything", 2023, section 3) from ``segment_anything.modeling``, unchanged; prompts and
low-resolution masks live in SAM's 1024x1024 frame whatever the encoder resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from ..transforms import preprocess
from .backbone import BACKBONES, NORM_EPS, EfficientViTLargeBackbone, StageConfig
from .image_encoder import EMBED_DIM, EMBED_SIZE, PROMPT_FRAME_SIZE, EfficientViTSamImageEncoder, SamNeck

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EfficientViTSamConfig:
    """Architecture of one EfficientViT-SAM variant (official ``efficientvit_sam_*`` builders).

    Attributes:
        name: registry name, e.g. ``"efficientvit-sam-l0"``.
        input_size: encoder input side in pixels (images are resized so the long side is this).
        stages: backbone stage layout.
        neck_features: backbone features fused by the neck, deepest first.
        neck_depth: fused-MBConv blocks in the neck.
        neck_expand_ratio: their expansion ratio.
        checkpoint_file: file name of the official checkpoint.
    """

    name: str
    input_size: int
    stages: tuple[StageConfig, ...]
    neck_features: tuple[str, ...]
    neck_depth: int
    neck_expand_ratio: float
    checkpoint_file: str

    @property
    def neck_channels(self) -> tuple[int, ...]:
        """Channels of the fused backbone features, in ``neck_features`` order."""
        return tuple(self.stages[int(f.removeprefix("stage"))].width for f in self.neck_features)


_L_NECK = ("stage4", "stage3", "stage2")
_XL_NECK = ("stage5", "stage4", "stage3")

#: The five official variants (``efficientvit/models/efficientvit/sam.py``).
EFFICIENTVIT_SAM_CONFIGS: dict[str, EfficientViTSamConfig] = {
    cfg.name: cfg
    for cfg in (
        EfficientViTSamConfig("efficientvit-sam-l0", 512, BACKBONES["l0"], _L_NECK, 4, 1, "efficientvit_sam_l0.pt"),
        EfficientViTSamConfig("efficientvit-sam-l1", 512, BACKBONES["l1"], _L_NECK, 8, 1, "efficientvit_sam_l1.pt"),
        EfficientViTSamConfig("efficientvit-sam-l2", 512, BACKBONES["l2"], _L_NECK, 12, 1, "efficientvit_sam_l2.pt"),
        EfficientViTSamConfig("efficientvit-sam-xl0", 1024, BACKBONES["xl0"], _XL_NECK, 6, 4, "efficientvit_sam_xl0.pt"),
        EfficientViTSamConfig("efficientvit-sam-xl1", 1024, BACKBONES["xl1"], _XL_NECK, 12, 4, "efficientvit_sam_xl1.pt"),
    )
}


class EfficientViTSam(nn.Module):
    """EfficientViT-SAM model, duck-type compatible with ``segment_anything.modeling.Sam`` where
    ``SamPredictor`` / ``SamAutomaticMaskGenerator`` need it (``image_encoder.img_size``,
    ``prompt_encoder``, ``mask_decoder``, ``postprocess_masks``, ``mask_threshold``,
    ``image_format``, ``device``), but with its own image preprocessing (:meth:`preprocess`):
    the encoder sees the image resized directly to ``input_size``, not to 1024 first.

    Use :class:`retailklip.segment.predictor.EfficientViTSamPredictor` (not ``SamPredictor``) to
    prompt it.

    Attributes:
        config: the variant's :class:`EfficientViTSamConfig`.
        mask_threshold: logit threshold of a binary mask (0.0, as SAM).
        image_format: channel order expected by :meth:`preprocess` (``"RGB"``).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, config: EfficientViTSamConfig) -> None:
        super().__init__()
        self.config = config
        backbone = EfficientViTLargeBackbone(config.stages)
        neck = SamNeck(
            config.neck_features,
            config.neck_channels,
            head_width=EMBED_DIM,
            head_depth=config.neck_depth,
            expand_ratio=config.neck_expand_ratio,
        )
        self.image_encoder = EfficientViTSamImageEncoder(backbone, neck, config.input_size)
        self.prompt_encoder = PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
            input_image_size=(PROMPT_FRAME_SIZE, PROMPT_FRAME_SIZE),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        # The official model zoo sets eps=1e-6 on every BatchNorm/LayerNorm/GroupNorm of the
        # whole model (including the decoder's nn.LayerNorm layers), after construction.
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                module.eps = NORM_EPS

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.parameters()).device

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Official preprocessing (see :mod:`retailklip.segment.transforms`).

        Args:
            rgb: uint8 (H, W, 3) RGB image.

        Returns:
            float32 (1, 3, input_size, input_size) on the model's device.

        Raises:
            InvalidImageError: ``rgb`` is not a uint8 (H, W, 3) array.
        """
        return preprocess(rgb, self.config.input_size).to(self.device)

    @torch.no_grad()
    def image_embeddings(self, rgb: np.ndarray) -> torch.Tensor:
        """SAM image embedding of one RGB image.

        Args:
            rgb: uint8 (H, W, 3) RGB image, any size.

        Returns:
            float32 (1, 256, 64, 64) on the model's device.

        Raises:
            InvalidImageError: ``rgb`` is not a uint8 (H, W, 3) array.
        """
        return self.image_encoder(self.preprocess(rgb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image encoder on already preprocessed images: (B, 3, S, S) -> (B, 256, 64, 64)."""
        return self.image_encoder(x)

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale low-resolution mask logits to the original image, as ``Sam.postprocess_masks``.

        Args:
            masks: (B, C, 256, 256) logits in SAM's 1024 frame.
            input_size: (H, W) of the image resized to long side 1024, pixels (crops padding).
            original_size: (H, W) of the original image, pixels.

        Returns:
            (B, C, H, W) logits at ``original_size`` (bilinear, ``align_corners=False``).
        """
        frame = self.image_encoder.img_size
        masks = F.interpolate(masks, (frame, frame), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def build_efficientvit_sam(name: str) -> EfficientViTSam:
    """Build an EfficientViT-SAM variant with random (PyTorch default) weights, in eval mode.

    Args:
        name: one of :data:`EFFICIENTVIT_SAM_CONFIGS` (``efficientvit-sam-l0`` ... ``-xl1``).

    Returns:
        The model; build it under ``with torch.device("meta"):`` to get shapes without memory.

    Raises:
        KeyError: unknown variant name.
    """
    try:
        config = EFFICIENTVIT_SAM_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown EfficientViT-SAM variant {name!r}; expected one of {sorted(EFFICIENTVIT_SAM_CONFIGS)}") from None
    logger.debug("building %s (encoder input %dx%d)", name, config.input_size, config.input_size)
    return EfficientViTSam(config).eval()
