"""SAM's mask decoder with the image tokens kept in factored form: per prompt, only low-rank work.

In SAM's mask decoder (Kirillov et al., *Segment Anything*, 2023, sec. 3 and app. A) each prompt
runs a two-way transformer over the 4096 image tokens of one image: every block updates all of
them (image-to-token attention, residual, LayerNorm) and every attention projects them (4096 x
256 x 128 multiply-adds per projection, about 1.2 G per prompt, then 0.4 G for the upscaling).
But a prompt changes the image tokens only through its attention *weights*: the image-to-token
attention gives image token ``i`` the update ``sum_h A_h[i] (V_h W_o,h)``, where ``A_h`` (4096 x
T) are the softmax weights of head ``h`` over the prompt's T tokens (5 output tokens + the
point / box embeddings) and ``V_h W_o,h`` (T x 256) are T row vectors. So after block ``l`` the
image tokens of prompt ``b`` are exactly::

    X_b = diag(a_b) P_l  +  Lambda_b R_b  +  1 beta_l^T

* ``P_l`` (4096 x 256): the image embedding pushed through the blocks' fixed LayerNorm maps
  (centring, gain), the same for every prompt: computed once per image;
* ``a_b`` (4096,): per-token scale (the product of the LayerNorms' 1 / std);
* ``Lambda_b`` (4096 x r), ``R_b`` (r x 256): the attention weights (scaled) and their rows, r =
  8 heads x T tokens per block plus one column per bias vector (57 after block 1, 115 after
  block 2 for a point prompt), well below the width 256.

Everything the decoder needs of the image tokens is computed from this form without ever
materialising them per prompt:

* a projection ``X W^T`` is ``a * (P_l W^T) + Lambda (R W^T)``, with ``P_l W^T`` once per image;
  attention scores and values multiply ``Lambda`` by T-row matrices first, so a head costs
  4096 x T x r instead of 4096 x 256 x 32;
* LayerNorm needs each token's mean and variance: the mean is linear, and the squared norm of a
  centred token is ``a^2 |p|^2 + 2 a (p . Lambda R) + Lambda (R R^T) Lambda^T``; the cross term's
  ``p_i . r_k`` come from per-image products of ``P_l`` with the fixed row bases (``W_o`` of each
  block, the bias vectors), so no (4096 x 256) x (256 x r) product runs per prompt;
* the first upscaling layer (a 2 x 2 stride-2 transposed convolution: a per-token linear map) is
  applied in the same factored form; from its LayerNorm on, the upscaling runs per prompt as in
  SAM, but only over the token rows and columns of the photo's valid area when the caller
  crops the masks to it (a 16:9 photo uses 56 % of SAM's square frame).

The arithmetic is SAM's up to floating-point rounding (another summation order). Tested on a
real photo against SAM's ``MaskDecoder`` run in float64: the error of this float32 decoder is
within 2x that of SAM's own float32 decoder, also with the weight matrices scaled x8 to
trained-model activation sizes (``tests/test_segment_factored_decoder.py``). Per prompt this is
about 0.35 G multiply-adds instead of 1.6 G: 0.18x SAM's decoder time per prompt on 2 CPU cores
(``benchmarks/bench_decoder.py``, docs/segmentation.md "Decoder speed"). Calls with a mask
prompt (per-prompt dense embeddings) or several images go to SAM's own code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from .fast_decoder import ImageSharedMaskDecoder


def _head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, heads * d) -> (heads, d, N), contiguous: a per-image projection laid out for
    ``bmm`` with per-head token matrices (heads, B * T, d)."""
    n, width = x.shape
    return x.T.reshape(heads, width // heads, n).contiguous()


def _token_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads * d) -> (heads, B * T, d), contiguous."""
    b, t, width = x.shape
    return x.view(b, t, heads, width // heads).permute(2, 0, 1, 3).reshape(heads, b * t, width // heads)


@dataclass
class _Block:
    """Per-image terms of one two-way block; ``P_l`` is the block's incoming image base and C
    the centring map. Projections are laid out (H, d, N)."""

    k: torch.Tensor  # P_l Wk^T: token-to-image keys, image part
    k_pe: torch.Tensor  # pe Wk^T + bk
    v: torch.Tensor  # P_l Wv^T (the value bias is added after the attention: the weights sum to 1)
    q: torch.Tensor  # P_l Wq^T: image-to-token queries, image part
    q_pe: torch.Tensor  # pe Wq^T + bq
    norm2: torch.Tensor  # (N,): |P_l C|^2 per token
    cross: list[torch.Tensor]  # per block j <= l: P_l C F_j^T, F_j block j's W_o rows as they are at block l
    cross_bias: torch.Tensor  # (m, N): P_l C e^T for the m bias rows present at this LayerNorm


@dataclass
class ImageTerms:
    """Everything :class:`FactoredMaskDecoder` computes once per image (and dense prompt).

    Attributes:
        blocks: per two-way block, the projections of its incoming image base ``P_l``.
        final_k, final_k_pe, final_v: the final token-to-image attention's projections of the
            last base, (H, d, N) each.
        up: float (N, 4 * C / 4): the first upscaling layer (no bias) applied to the last base,
            columns ordered (row offset, column offset, channel).
        grid: (h, w) of the image tokens (64 x 64 for SAM).
    """

    blocks: list[_Block]
    final_k: torch.Tensor
    final_k_pe: torch.Tensor
    final_v: torch.Tensor
    up: torch.Tensor
    grid: tuple[int, int]


def _conv_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2 x 2 stride-2 transposed convolution as a per-pixel linear map (in, 4 * out), the
    output columns ordered (row offset, column offset, channel) so channels are innermost."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)


class FactoredMaskDecoder(nn.Module):
    """Drop-in replacement of a ``segment_anything`` ``MaskDecoder`` that keeps the image tokens
    in factored form (module docstring): per prompt it costs low-rank work only.

    Same call as ``MaskDecoder.forward``; the wrapped decoder's submodules (and so its
    parameters) are used, not copied, under the same names. The per-image terms are cached for
    the last image (keyed by the identity and version of the embedding, PE and dense-prompt
    tensors), so the batches of one photo compute them once. For inference (no autograd).

    Args:
        decoder: SAM's mask decoder (or an :class:`ImageSharedMaskDecoder` around one) with a
            ``TwoWayTransformer`` whose first block skips the positional encoding (SAM's).

    Raises:
        TypeError: ``decoder`` is not a ``segment_anything.modeling.MaskDecoder`` of that form.
    """

    def __init__(self, decoder: MaskDecoder) -> None:
        if isinstance(decoder, ImageSharedMaskDecoder):
            decoder = decoder.plain
        if not isinstance(decoder, MaskDecoder) or not isinstance(decoder.transformer, TwoWayTransformer):
            raise TypeError(f"FactoredMaskDecoder wraps a segment_anything MaskDecoder, got {type(decoder).__name__}")
        up = decoder.output_upscaling
        if not (len(up) == 5 and isinstance(up[0], nn.ConvTranspose2d) and isinstance(up[1], LayerNorm2d)
                and isinstance(up[3], nn.ConvTranspose2d) and up[0].kernel_size == up[0].stride == (2, 2)
                and up[3].kernel_size == up[3].stride == (2, 2)):
            raise TypeError("FactoredMaskDecoder needs SAM's output upscaling (two 2x2 stride-2 transposed convolutions)")
        if not decoder.transformer.layers[0].skip_first_layer_pe:
            raise TypeError("FactoredMaskDecoder needs a first two-way block without positional encoding (SAM's)")
        super().__init__()
        for name, child in decoder.named_children():
            self.add_module(name, child)
        self.transformer_dim = decoder.transformer_dim
        self.num_multimask_outputs = decoder.num_multimask_outputs
        self.num_mask_tokens = decoder.num_mask_tokens
        object.__setattr__(self, "plain", decoder)  # SAM's code path, not a second registration
        self._cache: tuple | None = None
        #: prompts upscaled together (memory and cache locality; the result does not change)
        self.upscale_chunk = 1

    # ------------------------------------------------------------------ per image
    def clear_cache(self) -> None:
        """Forget the cached per-image terms (the next call computes them again)."""
        self._cache = None

    def image_terms(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                    dense_prompt_embedding: torch.Tensor) -> ImageTerms:
        """The per-image terms, cached for the last image: ``image_embeddings`` and
        ``image_pe`` float (1, C, h, w), ``dense_prompt_embedding`` (1, C, h, w) (SAM's
        ``no_mask_embed`` broadcast). About 2 G multiply-adds for SAM's decoder; the cache is
        keyed by the three tensors' values (SAM's prompt encoder makes a new PE and dense
        tensor on every call), compared with ``torch.equal``."""
        inputs = (image_embeddings, image_pe, dense_prompt_embedding)
        cached = self._cache  # one read: another thread may replace it meanwhile
        if cached is not None and all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                                      and torch.equal(x, y) for x, y in zip(cached[0], inputs)):
            return cached[1]
        with torch.no_grad():
            terms = self._image_terms(*inputs)
            self._cache = (tuple(x.detach().clone() for x in inputs), terms)
        return terms

    def _image_terms(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> ImageTerms:
        t = self.transformer
        heads = t.num_heads
        _, c, h, w = image_embeddings.shape
        base = (image_embeddings + dense).flatten(2)[0].T  # (N, C)
        pe = image_pe.flatten(2)[0].T
        fixed = base.new_zeros(0, c)  # the bias rows in every prompt's tokens (out_proj and norm4 biases)
        outs: list[torch.Tensor] = []  # per block: its W_o rows (Ci, C), mapped like the base since
        blocks = []
        for layer in t.layers:
            t2i, i2t, norm = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token, layer.norm4
            centred = base - base.mean(1, keepdim=True)
            outs.append(i2t.out_proj.weight.T)  # block l's rows: V_h W_o[:, h]^T
            fixed = torch.cat([fixed, i2t.out_proj.bias[None]])
            blocks.append(_Block(
                k=_head_major(base @ t2i.k_proj.weight.T, heads),
                k_pe=_head_major(pe @ t2i.k_proj.weight.T + t2i.k_proj.bias, heads),
                v=_head_major(base @ t2i.v_proj.weight.T, heads).transpose(1, 2).contiguous(),
                q=_head_major(base @ i2t.q_proj.weight.T, heads),
                q_pe=_head_major(pe @ i2t.q_proj.weight.T + i2t.q_proj.bias, heads),
                norm2=(centred * centred).sum(1),
                cross=[_head_major(centred @ f.T, heads) for f in outs],
                cross_bias=(centred @ fixed.T).T.contiguous(),
            ))
            # the block's LayerNorm maps the base, the W_o rows and the bias rows alike: centre, gain
            base = centred * norm.weight
            outs = [(f - f.mean(1, keepdim=True)) * norm.weight for f in outs]
            fixed = torch.cat([(fixed - fixed.mean(1, keepdim=True)) * norm.weight, norm.bias[None]])
        final = t.final_attn_token_to_image
        return ImageTerms(
            blocks=blocks,
            final_k=_head_major(base @ final.k_proj.weight.T, heads),
            final_k_pe=_head_major(pe @ final.k_proj.weight.T + final.k_proj.bias, heads),
            final_v=_head_major(base @ final.v_proj.weight.T, heads).transpose(1, 2).contiguous(),
            up=base @ _conv_weight(self.output_upscaling[0]),
            grid=(h, w),
        )

    # ------------------------------------------------------------------ the call
    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions, as ``MaskDecoder.forward``: :meth:`predict` without a crop.

        Returns:
            ``(masks, iou_pred)``: float (B, 3 or 1, 256, 256) mask logits in SAM's 1024 frame
            at 1/4 resolution, float (B, 3 or 1) predicted IoU.
        """
        return self.predict(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                            multimask_output)

    def predict(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions, the masks cropped to the top-left ``size`` = (h, w) cells
        of the 256 x 256 frame (a photo's valid area, :class:`~retailklip.segment.bounded.SamPromptDecoder`'s
        ``low_res_size``): only the image tokens under that area are upscaled.

        Args:
            image_embeddings: float (1, 256, 64, 64) embedding of one image.
            image_pe: float (1, 256, 64, 64) dense positional encoding (``get_dense_pe()``).
            sparse_prompt_embeddings: float (B, N, 256) point/box embeddings, B prompts.
            dense_prompt_embeddings: float (B, 256, 64, 64); prompt-independent (a broadcast,
                batch stride 0, or B == 1) unless a mask prompt was given (then SAM's code runs).
            multimask_output: three masks per prompt (True) or one.
            size: (h, w) of the crop, or None for the whole frame.

        Returns:
            float (B, 3 or 1, h, w) mask logits and float (B, 3 or 1) predicted IoU.

        Raises:
            ValueError: ``size`` outside the mask frame.
        """
        d = dense_prompt_embeddings
        grid = image_embeddings.shape[-2:]
        frame = (4 * grid[0], 4 * grid[1])
        if size is not None and not (0 < size[0] <= frame[0] and 0 < size[1] <= frame[1]):
            raise ValueError(f"size must be within the {frame[0]}x{frame[1]} mask frame, got {size}")
        if image_embeddings.shape[0] != 1 or not (d.shape[0] == 1 or d.stride(0) == 0):
            masks, iou = self.plain(image_embeddings, image_pe, sparse_prompt_embeddings, d, multimask_output)
            return (masks if size is None else masks[..., : size[0], : size[1]]), iou
        outputs = range(1, self.num_mask_tokens) if multimask_output else range(1)
        size = size or frame
        if sparse_prompt_embeddings.shape[0] == 0:
            empty = sparse_prompt_embeddings.new_zeros(0, len(outputs))
            return empty[..., None, None].expand(-1, -1, *size).contiguous(), empty
        terms = self.image_terms(image_embeddings, image_pe, d[:1])
        return self._predict(terms, sparse_prompt_embeddings, outputs, size)

    def _predict(self, terms: ImageTerms, sparse: torch.Tensor, outputs: range, size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.transformer
        b = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # (B, T, C)
        state = _State(tokens, t.num_heads, terms.up.shape[0], len(t.layers))
        queries = tokens
        for index, (layer, blk) in enumerate(zip(t.layers, terms.blocks)):
            if index == 0:  # skip_first_layer_pe: self-attention without PE, no residual
                queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
            else:
                q = queries + tokens
                queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            t2i = layer.cross_attn_token_to_image
            queries = layer.norm2(queries + state.tokens_to_image(t2i, queries + tokens, blk.k, blk.k_pe, blk.v))
            queries = layer.norm3(queries + layer.mlp(queries))
            state.image_to_tokens(layer.cross_attn_image_to_token, queries, tokens, blk)
            state.layer_norm(layer.norm4, blk)
        final = t.final_attn_token_to_image
        hs = t.norm_final_attn(queries + state.tokens_to_image(final, queries + tokens, terms.final_k,
                                                                terms.final_k_pe, terms.final_v))
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, outputs.start : outputs.stop]
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in outputs], dim=1)
        return self._upscale(terms, state, hyper, size), iou_pred

    def _upscale(self, terms: ImageTerms, state: _State, hyper: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """SAM's ``output_upscaling`` and hypernetwork product over the token rows/columns under
        the top-left ``size`` cells: (B, K, size[0], size[1]) mask logits."""
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        gh, gw = terms.grid
        rows, cols = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
        b, k = hyper.shape[:2]
        c1, c2 = conv1.out_channels, conv2.out_channels
        # the first transposed convolution is a per-token linear map C -> (2, 2, c1): factored
        base = terms.up.view(gh, gw, -1)[:rows, :cols].reshape(rows * cols, -1)
        y = state.project(base, _conv_weight(conv1), conv1.bias.repeat(4), (rows, cols, gw))  # (B, M, 4 * c1)
        w2, b2 = _conv_weight(conv2), conv2.bias.repeat(4)
        out = y.new_empty(b, k, rows, 4, cols, 4)
        step = self.upscale_chunk
        for s in range(0, b, step):  # a few prompts at a time: the activations stay in the cache
            e = min(s + step, b)
            z = act1(nn.functional.layer_norm(y[s:e].view(-1, c1), (c1,), norm.weight, norm.bias, norm.eps))
            z = act2(torch.addmm(b2, z, w2))  # (n * M * 4, 4 * c2): LayerNorm2d, GELU, conv, GELU
            masks = torch.bmm(z.view(e - s, -1, c2), hyper[s:e].transpose(1, 2))  # (n, M * 16, K)
            out[s:e].view(e - s, k, rows, 2, 2, cols, 2, 2).copy_(
                masks.view(e - s, rows, cols, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6))
        return out.view(b, k, 4 * rows, 4 * cols)[..., : size[0], : size[1]]


class _State:
    """One batch of B prompts' image tokens in factored form ``diag(a) P_l + Lambda R``
    (module docstring).

    ``a`` (B, N) per-token scale (None: all ones, before the first LayerNorm); ``lam`` (B,
    r_max, N) the coefficients Lambda^T, of which the first ``r`` rows are in use; ``rows`` (B,
    r_max, C) the row vectors R. ``blocks`` lists each attention block's first row and its
    value vectors (H, B * T, d); ``bias_rows`` the rows of the fixed bias vectors, in the order
    of the per-image ``cross_bias``; ``ones_row`` a row whose coefficient is 1 on every token
    (the last LayerNorm's bias).
    """

    def __init__(self, tokens: torch.Tensor, heads: int, n: int, depth: int) -> None:
        b, self.t, c = tokens.shape
        self.heads, self.b, self.n = heads, b, n
        width = depth * (heads * self.t + 2)
        self.a: torch.Tensor | None = None
        self.lam = tokens.new_empty(b, width, n)
        self.rows = tokens.new_empty(b, width, c)
        self.r = 0
        self.blocks: list[tuple[int, torch.Tensor]] = []
        self.bias_rows: list[int] = []
        self.ones_row = -1

    def _scores(self, tok: torch.Tensor, img: torch.Tensor, img_pe: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """Dot products (H, B, T, N) of per-head token vectors ``tok`` (H, B * T, d) with the
        image tokens' projection ``proj(X + pe)``, whose per-image parts are ``img`` (the base's,
        scaled by ``a``) and ``img_pe`` (PE and bias), (H, d, N)."""
        h, d = self.heads, tok.shape[-1]
        scores = torch.bmm(tok, img).view(h, self.b, self.t, self.n)
        if self.a is not None:
            scores.mul_(self.a[None, :, None, :])
        scores.view(h, -1, self.n).baddbmm_(tok, img_pe)
        if self.r:
            coef = (self.rows[:, : self.r] @ proj.weight.T).view(self.b, self.r, h, d)  # (B, r, H, d)
            coef = torch.einsum("hbtd,brhd->hbtr", tok.view(h, self.b, self.t, d), coef)
            for i in range(h):
                scores[i].baddbmm_(coef[i], self.lam[:, : self.r])
        return scores

    def tokens_to_image(self, attn, queries: torch.Tensor, k: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor
                        ) -> torch.Tensor:
        """SAM's ``Attention(q=queries, k=X + pe, v=X)`` with the image tokens X in factored
        form: ``queries`` (B, T, C); ``k``, ``k_pe`` (H, d, N), ``v`` (H, N, d) per-image terms.
        Returns (B, T, C)."""
        tok = _token_major(attn.q_proj(queries), self.heads)
        tok = tok / math.sqrt(tok.shape[-1])  # SAM scales the products; scaling a factor is cheaper
        weights = torch.softmax(self._scores(tok, k, k_pe, attn.k_proj), dim=-1)
        scaled = weights if self.a is None else weights * self.a[None, :, None, :]
        out = torch.bmm(scaled.view(self.heads, -1, self.n), v)  # (H, B * T, d)
        if self.r:
            d = out.shape[-1]
            coef = (self.rows[:, : self.r] @ attn.v_proj.weight.T).view(self.b, self.r, self.heads, d)
            for i in range(self.heads):  # (B, T, N) @ (B, N, r) @ (B, r, d)
                mixed = torch.bmm(weights[i], self.lam[:, : self.r].transpose(1, 2))
                out[i].view(self.b, self.t, d).baddbmm_(mixed, coef[:, :, i])
        out = out.view(self.heads, self.b, self.t, -1).permute(1, 2, 0, 3).reshape(self.b, self.t, -1)
        return attn.out_proj(out + attn.v_proj.bias)

    def image_to_tokens(self, attn, queries: torch.Tensor, tokens: torch.Tensor, blk: _Block) -> None:
        """Add SAM's ``Attention(q=X + pe, k=queries + tokens, v=queries)`` output to the image
        tokens: a new block of H * T rows whose coefficients are the attention weights."""
        h, b, t, n = self.heads, self.b, self.t, self.n
        key = _token_major(attn.k_proj(queries + tokens), h)  # (H, B * T, d)
        value = _token_major(attn.v_proj(queries), h)
        weights = torch.softmax(self._scores(key / math.sqrt(key.shape[-1]), blk.q, blk.q_pe, attn.q_proj), dim=2)
        start = self.r
        self.lam[:, start : start + h * t].view(b, h, t, n).copy_(weights.transpose(0, 1))
        w_o = attn.out_proj.weight.T.reshape(h, -1, attn.out_proj.weight.shape[0])  # (H, d, C)
        self.rows[:, start : start + h * t].view(b, h, t, -1).copy_(torch.bmm(value, w_o).view(h, b, t, -1).transpose(0, 1))
        self.blocks.append((start, value))
        self._append_row(attn.out_proj.bias, start + h * t)
        self.bias_rows.append(start + h * t)

    def _append_row(self, row: torch.Tensor, at: int) -> None:
        self.lam[:, at].fill_(1.0)
        self.rows[:, at] = row
        self.r = at + 1

    def layer_norm(self, norm: nn.LayerNorm, blk: _Block) -> None:
        """Apply ``norm`` (over the width C) to the tokens; ``blk`` holds the base's terms."""
        r, h, t, b, n = self.r, self.heads, self.t, self.b, self.n
        lam, rows = self.lam[:, :r], self.rows[:, :r]
        rows.sub_(rows.mean(-1, keepdim=True))  # centred rows (the mean of a token is linear in them)
        dense_rows = rows.contiguous()
        quad = (torch.bmm(torch.bmm(dense_rows, dense_rows.transpose(1, 2)), lam) * lam).sum(1)  # (B, N)
        cross = (lam[:, self.bias_rows] * blk.cross_bias).sum(1)
        for (start, value), basis in zip(self.blocks, blk.cross):
            # sum over the block's rows (h, t) of lam * (P_l C) . (v_t W_o,h)
            dots = torch.bmm(value, basis).view(h, b, t, n)  # (H, B, T, N)
            cross += (dots * lam[:, start : start + h * t].view(b, h, t, n).transpose(0, 1)).sum((0, 2))
        if self.a is None:
            var = blk.norm2 + 2 * cross + quad
        else:
            var = self.a * (self.a * blk.norm2 + 2 * cross) + quad
        inv = torch.rsqrt(var / rows.shape[-1] + norm.eps)
        self.a = inv if self.a is None else self.a * inv
        lam.mul_(inv[:, None, :])
        rows.mul_(norm.weight)
        self._append_row(norm.bias, r)
        self.bias_rows.append(r)
        self.ones_row = r

    def project(self, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, window: tuple[int, int, int]
                ) -> torch.Tensor:
        """``X W^T + bias`` over the tokens of a window (the first ``rows`` x ``cols`` of a grid
        ``gw`` wide): ``base`` (rows * cols, out) the base's product (per image), ``weight`` (C,
        out). Returns (B, rows * cols, out)."""
        rows, cols, gw = window
        b, r = self.b, self.r
        lam = self.lam[:, :r].view(b, r, -1, gw)[:, :, :rows, :cols].reshape(b, r, rows * cols)
        coef = self.rows[:, :r] @ weight  # (B, r, out)
        coef[:, self.ones_row] += bias  # that row's coefficient is 1 on every token
        out = torch.bmm(lam.transpose(1, 2), coef)
        a = self.a.view(b, -1, gw)[:, :rows, :cols].reshape(b, rows * cols, 1)
        return out.addcmul_(a, base)
