"""EfficientViT-SAM-L0 for the mask-decoder tests: random init with non-trivial norm and bias
parameters, a predictor holding a real photo, and prompt embeddings of points or boxes."""

from __future__ import annotations

import torch
from realphotos import grocery_rgb

from retailklip.segment import build_efficientvit_sam
from retailklip.segment.predictor import EfficientViTSamPredictor


def perturbed_l0():
    """``efficientvit-sam-l0`` (seed 0, eval) whose mask decoder's 1-d parameters (norm gains,
    biases) are shifted by N(0, 0.1): a swapped or misplaced term would show in the outputs."""
    torch.manual_seed(0)
    model = build_efficientvit_sam("efficientvit-sam-l0").eval()
    with torch.no_grad():
        for i, p in enumerate(model.mask_decoder.parameters()):
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model


def photo_predictor(model, rel: str = "train/Fruit/Orange/Orange_018.jpg") -> EfficientViTSamPredictor:
    """A predictor of ``model`` with the GroceryStore photo ``rel`` set (default 464 x 348)."""
    predictor = EfficientViTSamPredictor(model)
    predictor.set_image(grocery_rgb(rel))
    return predictor


def prompt_embeddings(predictor, points=None, boxes=None):
    """SAM's prompt encoder on photo-pixel ``points`` float (B, N, 2) (all positive) or
    ``boxes`` float (B, 4): ``(sparse (B, T, 256), dense (B, 256, 64, 64))``."""
    h, w = predictor.original_size
    if points is not None:
        coords = predictor.transform.apply_coords_torch(points, (h, w))
        prompts = (coords, torch.ones(coords.shape[:2], dtype=torch.int))
        return predictor.model.prompt_encoder(points=prompts, boxes=None, masks=None)
    return predictor.model.prompt_encoder(points=None, boxes=predictor.transform.apply_boxes_torch(boxes, (h, w)), masks=None)
