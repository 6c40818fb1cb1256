"""SAM's mask decoder with its prompt-independent work done once per image, not once per prompt.

``segment_anything.modeling.MaskDecoder.predict_masks`` copies the image embedding and its dense
positional encoding once per prompt (``repeat_interleave``: two 64-prompt copies of
(256, 64, 64) float32 are 2 x 268 MB) and runs the two-way transformer (Kirillov et al.,
*Segment Anything*, 2023, sec. 3 and app. A) on every copy. In the transformer's first block the
image tokens are still the same for every prompt (no mask prompt: the dense prompt embedding is
the ``no_mask_embed`` broadcast), so three of its 4096-token projections are prompt-independent:

* token-to-image attention: ``k_proj(image + pe)`` and ``v_proj(image)``;
* image-to-token attention: ``q_proj(image + pe)``.

:class:`ImageSharedMaskDecoder` computes those once per call (one batch of prompts on one
image) and lets the attention broadcast them over the prompts; everything after them (the
first block's image update, the second block, the final attention, the upscaling and the
hypernetwork heads) depends on the prompt and runs per prompt as in SAM. The arithmetic is the
same up to floating-point summation order (tested: mask logits within 1e-5 of
``MaskDecoder``'s on a real photo). A call with a mask prompt (per-prompt dense embeddings) or
several images falls back to SAM's own code path, so the wrapper is a drop-in replacement.

:func:`use_fast_decoder` swaps it into a SAM-like model (``model.mask_decoder``); the state-dict
keys do not change (the wrapper registers the decoder's own submodules under their names).
Measured in ``benchmarks/bench_decoder.py``.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention
from torch import nn


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` after the input projections: q, k, v are projected (B_or_1, N, C);
    batch dims of size 1 broadcast against the prompts."""
    q, k, v = _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)
    weights = q @ k.permute(0, 1, 3, 2)
    weights = weights / math.sqrt(q.shape[-1])
    out = torch.softmax(weights, dim=-1) @ v
    b, h, n, c = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class ImageSharedMaskDecoder(nn.Module):
    """Drop-in replacement of a ``segment_anything`` ``MaskDecoder`` sharing per-image work.

    Same call as ``MaskDecoder.forward``; the wrapped decoder's submodules (and so its
    parameters) are used, not copied, under the same names.

    Args:
        decoder: SAM's mask decoder (e.g. ``model.mask_decoder`` of an EfficientViT-SAM or SAM).

    Raises:
        TypeError: ``decoder`` is not a ``segment_anything.modeling.MaskDecoder``.
    """

    def __init__(self, decoder: MaskDecoder) -> None:
        if not isinstance(decoder, MaskDecoder):
            raise TypeError(f"ImageSharedMaskDecoder wraps a segment_anything MaskDecoder, got {type(decoder).__name__}")
        super().__init__()
        for name, child in decoder.named_children():
            self.add_module(name, child)
        self.transformer_dim = decoder.transformer_dim
        self.num_multimask_outputs = decoder.num_multimask_outputs
        self.num_mask_tokens = decoder.num_mask_tokens
        # The first block's image side is prompt-independent only without PE on its self-attention.
        self.shares_first_block = bool(decoder.transformer.layers[0].skip_first_layer_pe)
        object.__setattr__(self, "plain", decoder)  # SAM's code path, not a second registration

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions, as ``MaskDecoder.forward``.

        Args:
            image_embeddings: float (1, 256, 64, 64) embedding of one image.
            image_pe: float (1, 256, 64, 64) dense positional encoding (``get_dense_pe()``).
            sparse_prompt_embeddings: float (B, N, 256) point/box embeddings, B prompts.
            dense_prompt_embeddings: float (B, 256, 64, 64); prompt-independent (a broadcast,
                batch stride 0, or B == 1) unless a mask prompt was given.
            multimask_output: three masks per prompt (True) or one.

        Returns:
            ``(masks, iou_pred)``: float (B, 3 or 1, 256, 256) mask logits in SAM's 1024 frame
            at 1/4 resolution, float (B, 3 or 1) predicted IoU.
        """
        shared = self.shares_first_block and image_embeddings.shape[0] == 1 and (
            dense_prompt_embeddings.shape[0] == 1 or dense_prompt_embeddings.stride(0) == 0
        )
        if not shared:
            return self.plain(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output)
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings[:1])
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoUs; ``dense_prompt_embedding`` is (1, 256, 64, 64).

        Returns:
            float (B, 4, 256, 256) mask logits and float (B, 4) IoU predictions.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)
        _, c, h, w = image_embeddings.shape
        image = (image_embeddings + dense_prompt_embedding).flatten(2).permute(0, 2, 1)  # (1, HW, C)
        pe = image_pe.flatten(2).permute(0, 2, 1)

        transformer = self.transformer
        first, *rest = transformer.layers
        # First block, as TwoWayAttentionBlock.forward with skip_first_layer_pe, image shared.
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        to_image = first.cross_attn_token_to_image
        image_with_pe = image + pe
        k_shared, v_shared = to_image.k_proj(image_with_pe), to_image.v_proj(image)
        queries = first.norm2(queries + _attend(to_image, to_image.q_proj(queries + tokens), k_shared, v_shared))
        queries = first.norm3(queries + first.mlp(queries))
        to_tokens = first.cross_attn_image_to_token
        q_shared = to_tokens.q_proj(image_with_pe)
        point = queries + tokens
        keys = first.norm4(image + _attend(to_tokens, q_shared, to_tokens.k_proj(point), to_tokens.v_proj(queries)))
        # Remaining blocks and the final attention: per prompt (keys differ now), SAM's modules.
        for layer in rest:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + pe, v=keys)
        hs = transformer.norm_final_attn(queries + attn_out)

        # Upscaling and heads, as MaskDecoder.predict_masks.
        src = keys.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, self.num_mask_tokens, h, w)  # b may be 0
        return masks, self.iou_prediction_head(hs[:, 0, :])


def use_fast_decoder(model: nn.Module, *, compile: bool = False) -> nn.Module:
    """Replace ``model.mask_decoder`` by an :class:`ImageSharedMaskDecoder` around it (in place).

    Args:
        model: an :class:`~retailklip.segment.modeling.EfficientViTSam` or ``segment_anything``
            ``Sam`` (anything with a ``MaskDecoder`` as ``mask_decoder``); already wrapped: not
            wrapped again.
        compile: also ``torch.compile`` the decoder in place (``nn.Module.compile``: inductor
            fuses the per-prompt element-wise work; logits within 1e-5 of the plain decoder's).
            Opt-in: the first call compiles (about 20 s on 2 cores), and so does the first call
            with each new batch size; it needs a C++ compiler at run time.

    Returns:
        ``model``, whose state dict keeps the same keys and tensors.

    Raises:
        TypeError: ``model.mask_decoder`` is not a ``segment_anything`` ``MaskDecoder``.
    """
    if not isinstance(model.mask_decoder, ImageSharedMaskDecoder):
        model.mask_decoder = ImageSharedMaskDecoder(model.mask_decoder)
    if compile:
        model.mask_decoder.compile()
    return model
