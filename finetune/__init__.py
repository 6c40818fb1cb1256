"""RetailKLIP finetuning of retailklip encoders on one GPU (seed RetailKLIP §4.1).

Finetune an encoder (OpenCLIP ViT or timm trunk) so that its embeddings recognise products it
never saw by 1-NN against one augmented reference image per product, and hand the weights to
the catalog (``catalog init --encoder SPEC --weights OUT/encoder.safetensors``).

Modules, one idea each:

=================  ==========================================================================
``data``           labelled images from a CSV / folder per class; bad images skipped, counted
``sampler``        class balancing: breadth x depth images per epoch (§4.1.3)
``loss``           pytorch-metric-learning ArcFace (§4.1), class-weight imprinting
``optim``          AdamW with blockwise learning-rate decay (§4.1.2); warm-up + cosine
``model``          the encoder to train: BatchNorm freezing, gradient checkpointing, transforms
``evaluate``       the library's zero-shot evaluator on the weights being trained (§4.2)
``step``           one optimizer step: autocast, accumulation, clipping, gradient scaler
``records``        config.json, metrics.json, CSV logs, TensorBoard
``checkpoint``     save / resume training state
``export``         safetensors for the catalog (checked to reload); TorchScript / ONNX for POS CPUs
``train``          the Trainer: builds the pieces, runs epochs, evaluates, checkpoints, exports
``sweep``          choosing the depth by short runs (§4.1.3)
``config``         the run's settings
``cli``            ``python -m finetune``
``grocery``        GroceryStore split by coarse class: ``python -m finetune.grocery``
=================  ==========================================================================
"""

from .config import TrainConfig
from .errors import FinetuneError

__all__ = ["FinetuneError", "TrainConfig"]
