"""EfficientViT-SAM image encoder: EfficientViT backbone + SAM neck + LayerNorm.

Source: Zhang et al., "EfficientViT-SAM: Accelerated Segment Anything Model Without Accuracy
Loss" (2024), section 3.1 and figure 2: the neck projects three backbone stages to 256
channels, upsamples them to 64x64, sums them, refines the sum with fused-MBConv blocks and
projects to SAM's 256-channel image embedding, which SAM's prompt encoder and mask decoder
consume unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.layers import GELUTanh
from timm.models.efficientvit_mit import ConvNormAct, FusedMBConv, ResidualBlock
from torch import nn

from .backbone import NORM_EPS, EfficientViTLargeBackbone

#: Side of SAM's image embedding grid (64x64 tokens of 16x16 pixels in the 1024 frame).
EMBED_SIZE = 64
#: Channels of SAM's image embedding.
EMBED_DIM = 256
#: Side of SAM's prompt / mask coordinate frame, in pixels (``Sam.image_encoder.img_size``).
PROMPT_FRAME_SIZE = 1024


class SamNeck(nn.Module):
    """Fuse multi-scale backbone features into SAM's (B, 256, 64, 64) embedding.

    Args:
        in_features: backbone feature names to fuse, deepest first (e.g. ``("stage4",
            "stage3", "stage2")``); summed in this order as the official ``DAGBlock``.
        in_channels: channels of each named feature.
        head_width: fused channels.
        head_depth: number of residual fused-MBConv refinement blocks.
        expand_ratio: expansion of those blocks.
        out_dim: output channels (SAM embedding dim).
        embed_size: output spatial side; inputs are resized to it with bicubic interpolation
            (``align_corners=False``) unless already that size.

    Shapes: ``forward`` takes a dict of (B, C_i, H_i, W_i) float32 maps, returns
    (B, out_dim, embed_size, embed_size) float32.
    """

    def __init__(
        self,
        in_features: tuple[str, ...],
        in_channels: tuple[int, ...],
        head_width: int,
        head_depth: int,
        expand_ratio: float,
        out_dim: int = EMBED_DIM,
        embed_size: int = EMBED_SIZE,
    ) -> None:
        super().__init__()
        if len(in_features) != len(in_channels) or not in_features:
            raise ValueError(f"in_features {in_features} and in_channels {in_channels} must be non-empty and equally long")
        norm_layer = partial(nn.BatchNorm2d, eps=NORM_EPS)
        self.in_features = tuple(in_features)
        self.embed_size = embed_size
        self.inputs = nn.ModuleList(
            [ConvNormAct(c, head_width, 1, norm_layer=norm_layer, act_layer=None) for c in in_channels]
        )
        self.blocks = nn.Sequential(
            *[
                ResidualBlock(
                    FusedMBConv(
                        head_width,
                        head_width,
                        expand_ratio=expand_ratio,
                        norm_layer=norm_layer,
                        act_layer=(GELUTanh, None),
                    ),
                    nn.Identity(),
                )
                for _ in range(head_depth)
            ]
        )
        self.out_conv = ConvNormAct(head_width, out_dim, 1, bias=True, norm_layer=None, act_layer=None)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        size = (self.embed_size, self.embed_size)
        projected = []
        for name, proj in zip(self.in_features, self.inputs):
            x = proj(feats[name])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            projected.append(x)
        # x0 + (x1 + (x2 + ...)): the official summation order, for bit-level parity.
        fused = projected[-1]
        for x in reversed(projected[:-1]):
            fused = x + fused
        return self.out_conv(self.blocks(fused))


class EfficientViTSamImageEncoder(nn.Module):
    """Backbone + :class:`SamNeck` + channel LayerNorm (eps 1e-6).

    Attributes:
        input_size: side of the square, padded encoder input in pixels (512 for L, 1024 for XL).
        img_size: side of SAM's prompt/mask coordinate frame (1024), the attribute
            ``segment_anything.SamPredictor`` reads; it is *not* the encoder input size.

    Shapes: ``forward`` takes (B, 3, input_size, input_size) normalised float32 and returns
    (B, 256, 64, 64) float32.
    """

    img_size: int = PROMPT_FRAME_SIZE

    def __init__(self, backbone: EfficientViTLargeBackbone, neck: SamNeck, input_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.norm = LayerNorm2d(neck.out_conv.conv.out_channels, eps=NORM_EPS)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.neck(self.backbone(x)))
