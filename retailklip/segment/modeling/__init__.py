"""Model definitions of the segmentation stage (EfficientViT-SAM built from timm + segment_anything)."""

from .backbone import BACKBONES, EfficientViTLargeBackbone, LiteMLABlock, LiteMLAStage, StageConfig
from .efficientvit_sam import EFFICIENTVIT_SAM_CONFIGS, EfficientViTSam, EfficientViTSamConfig, build_efficientvit_sam
from .image_encoder import EfficientViTSamImageEncoder, SamNeck

__all__ = [
    "BACKBONES",
    "EFFICIENTVIT_SAM_CONFIGS",
    "EfficientViTLargeBackbone",
    "EfficientViTSam",
    "EfficientViTSamConfig",
    "EfficientViTSamImageEncoder",
    "LiteMLABlock",
    "LiteMLAStage",
    "SamNeck",
    "StageConfig",
    "build_efficientvit_sam",
]
