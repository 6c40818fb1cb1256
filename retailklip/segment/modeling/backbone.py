"""EfficientViT-L and EfficientViT-XL backbones of EfficientViT-SAM, built from timm's blocks.

Source: Cai et al., "EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense
Prediction" (ICCV 2023), section 3 (EfficientViT module: lightweight multi-scale linear
attention + MBConv) and Zhang et al., "EfficientViT-SAM: Accelerated Segment Anything Model
Without Accuracy Loss" (CVPR 2024 workshops), section 3.1 (the L/XL image encoders).

The convolution / attention blocks are the ones of :mod:`timm.models.efficientvit_mit`
(``Stem``, ``EfficientVitLargeStage``, ``LiteMLA``, ``MBConv``, ``ResidualBlock``). timm covers
the EfficientViT-L layout exactly; the XL layout (six stages, attention stages whose
multi-scale aggregation uses 3x3 kernels and whose expand ratio is 4 in stage 4) has no timm
counterpart, so :class:`LiteMLAStage` assembles those stages from the same timm blocks.

Module names differ from the official ``mit-han-lab/efficientvit`` code (timm calls the stem
``stem.in_conv``/``stem.res{i}`` and a stage's blocks ``blocks.{i}``); the key remapping to and
from the official checkpoint layout lives in :mod:`retailklip.segment.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import GELUTanh
from timm.models.efficientvit_mit import (
    EfficientVitLargeStage,
    LiteMLA,
    MBConv,
    ResidualBlock,
    Stem,
    build_local_block,
)
from torch import nn

#: Epsilon of the linear-attention normaliser ``out / (sum + eps)`` in the official LiteMLA
#: (``efficientvit/models/nn/ops.py``); timm defaults to 1e-5, the checkpoints were trained with 1e-15.
LITE_MLA_EPS = 1.0e-15
#: BatchNorm / LayerNorm epsilon the official model zoo sets on every norm layer
#: (``set_norm_eps(model, 1e-6)`` in ``efficientvit/sam_model_zoo.py``).
NORM_EPS = 1.0e-6
#: Channels per attention head (``qkv_dim`` in the official backbone, ``head_dim`` in timm).
HEAD_DIM = 32

BLOCK_TYPES = ("res", "fmb", "mb", "att", "att@3")


@dataclass(frozen=True)
class StageConfig:
    """One stage of an EfficientViT-L/XL backbone (the official ``width_list``/``depth_list``/
    ``block_list``/``expand_list``/``fewer_norm_list`` entries of one index).

    Attributes:
        width: output channels.
        depth: blocks after the stride-2 downsampling block (stage 0: residual blocks after the
            stride-2 input convolution).
        block: ``"res"`` (two 3x3 convs), ``"fmb"`` (fused MBConv), ``"mb"`` (MBConv),
            ``"att"`` (EfficientViT block, 5x5 aggregation) or ``"att@3"`` (3x3 aggregation).
        expand_ratio: MBConv expansion of the blocks; the downsampling block uses 4x this.
        fewer_norm: convolutions carry biases instead of BatchNorm except the last one.
    """

    width: int
    depth: int
    block: str
    expand_ratio: float
    fewer_norm: bool

    def __post_init__(self) -> None:
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"unknown EfficientViT block type {self.block!r}; expected one of {BLOCK_TYPES}")
        if self.width <= 0 or self.depth < 0:
            raise ValueError(f"stage width must be > 0 and depth >= 0, got width={self.width}, depth={self.depth}")


class LiteMLABlock(nn.Module):
    """EfficientViT block: multi-scale linear attention (context) then MBConv (local), both residual.

    Same computation as timm's ``EfficientVitBlock`` (paper section 3.1, figure 4) but with
    configurable aggregation kernel sizes ``scales`` and attention ``eps``, which the XL
    backbone needs (``att@3`` stages use 3x3 kernels).

    Args:
        channels: input = output channels C.
        expand_ratio: MBConv expansion (mid channels = round(C * expand_ratio)).
        scales: kernel sizes of the depthwise multi-scale token aggregation.
        norm_layer: BatchNorm2d factory (called with ``num_features``).
        act_layer: activation factory (called with ``inplace``).
        head_dim: channels per attention head.
        eps: linear-attention normaliser epsilon.

    Shapes: (B, C, H, W) float32 -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        expand_ratio: float,
        scales: tuple[int, ...],
        norm_layer: Callable[..., nn.Module],
        act_layer: Callable[..., nn.Module],
        head_dim: int = HEAD_DIM,
        eps: float = LITE_MLA_EPS,
    ) -> None:
        super().__init__()
        self.context_module = ResidualBlock(
            LiteMLA(
                in_channels=channels,
                out_channels=channels,
                dim=head_dim,
                norm_layer=(None, norm_layer),
                scales=scales,
                eps=eps,
            ),
            nn.Identity(),
        )
        self.local_module = ResidualBlock(
            MBConv(
                in_channels=channels,
                out_channels=channels,
                expand_ratio=expand_ratio,
                use_bias=(True, True, False),
                norm_layer=(None, None, norm_layer),
                act_layer=(act_layer, act_layer, None),
            ),
            nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.context_module(x)
        return self.local_module(x)


class LiteMLAStage(nn.Module):
    """Attention stage of the XL backbone: stride-2 MBConv (expand 4x``expand_ratio``, fewer
    norms) followed by ``depth`` :class:`LiteMLABlock` with aggregation kernels ``scales``.

    Shapes: (B, in_chs, H, W) -> (B, out_chs, ceil(H/2), ceil(W/2)).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        expand_ratio: float,
        scales: tuple[int, ...],
        norm_layer: Callable[..., nn.Module],
        act_layer: Callable[..., nn.Module],
        head_dim: int = HEAD_DIM,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            ResidualBlock(
                build_local_block(
                    in_channels=in_chs,
                    out_channels=out_chs,
                    stride=2,
                    expand_ratio=expand_ratio * 4,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    fewer_norm=True,
                    block_type="default",
                ),
                None,
            )
        ]
        blocks += [
            LiteMLABlock(out_chs, expand_ratio, scales, norm_layer, act_layer, head_dim=head_dim)
            for _ in range(depth)
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class EfficientViTLargeBackbone(nn.Module):
    """EfficientViT-L / -XL backbone returning every stage's feature map.

    Stage 0 is a stride-2 3x3 conv plus ``depth`` residual "res" blocks (timm ``Stem``); each
    further stage halves the resolution. Local stages and the L-style attention stage are timm's
    ``EfficientVitLargeStage``; XL-style attention stages (``att@3`` or expand != 6) are
    :class:`LiteMLAStage`. BatchNorm epsilon is :data:`NORM_EPS`, activations are tanh-GELU,
    LiteMLA epsilon is :data:`LITE_MLA_EPS`, as in the official EfficientViT-SAM models.

    Args:
        stages: per-stage configuration; ``stages[0]`` must be a ``"res"`` stage with
            expand ratio 1 and no ``fewer_norm``.
        in_chans: input image channels.

    Raises:
        ValueError: a stage combination that neither timm nor :class:`LiteMLAStage` builds.

    Shapes: ``forward`` takes (B, 3, S, S) float32 and returns ``{"stage0": (B, w0, S/2, S/2),
    "stage1": (B, w1, S/4, S/4), ...}`` (official feature names).
    """

    def __init__(self, stages: tuple[StageConfig, ...], in_chans: int = 3) -> None:
        super().__init__()
        if len(stages) < 2:
            raise ValueError("an EfficientViT backbone needs a stem and at least one stage")
        norm_layer = partial(nn.BatchNorm2d, eps=NORM_EPS)
        act_layer = GELUTanh
        s0 = stages[0]
        if s0.block != "res" or s0.expand_ratio != 1 or s0.fewer_norm:
            raise ValueError(f"stage 0 must be a 'res' stage with expand_ratio 1 and fewer_norm False, got {s0}")
        self.stem = Stem(in_chans, s0.width, s0.depth, norm_layer, act_layer, block_type="large")
        self.stages = nn.ModuleList()
        in_chs = s0.width
        for idx, cfg in enumerate(stages[1:], start=1):
            self.stages.append(self._build_stage(idx, in_chs, cfg, norm_layer, act_layer))
            in_chs = cfg.width
        self.widths = tuple(cfg.width for cfg in stages)
        # timm's EfficientVitBlock does not expose LiteMLA's eps; use the official value everywhere.
        for module in self.modules():
            if isinstance(module, LiteMLA):
                module.eps = LITE_MLA_EPS

    @staticmethod
    def _build_stage(
        idx: int,
        in_chs: int,
        cfg: StageConfig,
        norm_layer: Callable[..., nn.Module],
        act_layer: Callable[..., nn.Module],
    ) -> nn.Module:
        if cfg.block in ("fmb", "mb"):
            # timm: fused MBConv without fewer-norm, MBConv with fewer-norm; expand 4 (downsample 16).
            if (cfg.block == "mb") != cfg.fewer_norm or cfg.expand_ratio != 4:
                raise ValueError(
                    f"stage {idx}: local stages must be ('fmb', fewer_norm=False) or ('mb', fewer_norm=True) "
                    f"with expand_ratio 4, got {cfg}"
                )
            return EfficientVitLargeStage(
                in_chs, cfg.width, cfg.depth, norm_layer, act_layer, head_dim=HEAD_DIM,
                vit_stage=False, fewer_norm=cfg.fewer_norm,
            )
        if cfg.block.startswith("att"):
            if not cfg.fewer_norm:
                raise ValueError(f"stage {idx}: attention stages use fewer_norm=True, got {cfg}")
            if cfg.block == "att" and cfg.expand_ratio == 6:
                # fewer_norm=True also makes timm's downsampling block an MBConv, as the official.
                return EfficientVitLargeStage(
                    in_chs, cfg.width, cfg.depth, norm_layer, act_layer, head_dim=HEAD_DIM,
                    vit_stage=True, fewer_norm=True,
                )
            scales = (3,) if cfg.block == "att@3" else (5,)
            return LiteMLAStage(in_chs, cfg.width, cfg.depth, cfg.expand_ratio, scales, norm_layer, act_layer)
        raise ValueError(f"stage {idx}: block type {cfg.block!r} is only supported in stage 0")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        x = self.stem(x)
        feats["stage0"] = x
        for idx, stage in enumerate(self.stages, start=1):
            x = stage(x)
            feats[f"stage{idx}"] = x
        return feats


def _stages(widths, depths, blocks, expands, fewer_norms) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(*args) for args in zip(widths, depths, blocks, expands, fewer_norms))


_L_BLOCKS = ("res", "fmb", "fmb", "mb", "att")
_L_EXPANDS = (1, 4, 4, 4, 6)
_L_FEWER = (False, False, False, True, True)
_XL_BLOCKS = ("res", "fmb", "fmb", "fmb", "att@3", "att@3")
_XL_EXPANDS = (1, 4, 4, 4, 4, 6)
_XL_FEWER = (False, False, False, False, True, True)

#: Backbone layouts of the official ``efficientvit_backbone_l0/l1/l2`` and of the XL backbones
#: defined inline in ``efficientvit_sam_xl0/xl1`` (``efficientvit/models/efficientvit/sam.py``).
BACKBONES: dict[str, tuple[StageConfig, ...]] = {
    "l0": _stages((32, 64, 128, 256, 512), (1, 1, 1, 4, 4), _L_BLOCKS, _L_EXPANDS, _L_FEWER),
    "l1": _stages((32, 64, 128, 256, 512), (1, 1, 1, 6, 6), _L_BLOCKS, _L_EXPANDS, _L_FEWER),
    "l2": _stages((32, 64, 128, 256, 512), (1, 2, 2, 8, 8), _L_BLOCKS, _L_EXPANDS, _L_FEWER),
    "xl0": _stages((32, 64, 128, 256, 512, 1024), (0, 1, 1, 2, 3, 3), _XL_BLOCKS, _XL_EXPANDS, _XL_FEWER),
    "xl1": _stages((32, 64, 128, 256, 512, 1024), (1, 2, 2, 4, 6, 6), _XL_BLOCKS, _XL_EXPANDS, _XL_FEWER),
}
