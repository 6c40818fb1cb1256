"""Training-step speed and peak memory of finetune/ (RetailKLIP §4.1 on one GPU).

    python benchmarks/bench_finetune.py --encoder open_clip:ViT-B-16 --random-init --device cuda \\
        --precision bf16 --batch-sizes 64,128,256,512
    python benchmarks/bench_finetune.py --encoder open_clip:ViT-L-14 --random-init --device cuda \\
        --precision bf16 --grad-checkpointing on --batch-sizes 32,64,128,256
    python benchmarks/bench_finetune.py --encoder timm:mobilenetv2_100 --random-init --device cpu \\
        --precision fp32 --batch-sizes 4,8 --steps 2 --threads 1          # CPU smoke run

One full optimizer step per iteration, as ``finetune.train.Trainer.train_batch`` does it:
forward under autocast, float32 ArcFace (``--classes`` proxies), backward (gradient scaler for
fp16), gradient clipping, AdamW with the blockwise learning-rate groups.  Inputs are random
tensors already on the device, so the figures are the model's, not the data loader's.  Batch
sizes are tried in increasing order until one runs out of memory; the largest that fits is
reported.  As everywhere in benchmarks/, each figure is also given as a ratio to a baseline
measured in the same run: the fp32 step at the first batch size (images/s and peak memory).
Peak memory is CUDA's ``max_memory_allocated`` on a GPU; on the CPU it is the process's
maximum resident set so far, which never decreases, so CPU memory ratios are only upper bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from finetune.loss import create_arcface
from finetune.model import (
    freeze_batchnorm,
    input_config,
    resolve_freeze_bn,
    resolve_grad_checkpointing,
    set_grad_checkpointing,
)
from finetune.optim import create_optimizer, param_groups
from retailklip import create_encoder
from retailklip.devices import autocast


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, precision: str, batch: int) -> dict:
    """Images/s and peak memory [MiB] of ``args.steps`` timed optimizer steps (after 2 warm-up steps)."""
    device = torch.device(args.device)
    enc = create_encoder(args.encoder, weights=args.weights, random_init=args.weights is None, device=args.device,
                         **(json.loads(args.options) if args.options else {}))
    if resolve_freeze_bn(args.freeze_bn, enc.model, batch):
        freeze_batchnorm(enc)
    ckpt = resolve_grad_checkpointing(args.grad_checkpointing, args.encoder)
    if ckpt:
        set_grad_checkpointing(enc.model, True)
    model = enc.model.to(device).train()
    loss_fn = create_arcface(args.classes, enc.dim).to(device)
    opt = create_optimizer(param_groups(model, loss=loss_fn), fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    h, w = input_config(enc)["size"]
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, args.classes, (batch,), device=device)
    amp = autocast(device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with amp:
            feats = model(x)
        scaler.scale(loss_fn(feats.float(), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"encoder": args.encoder, "precision": precision, "batch_size": batch, "grad_checkpointing": ckpt,
            "images_per_s": batch * args.steps / dt, "peak_memory_mb": _peak_mb(device), "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="open_clip:ViT-B-16")
    p.add_argument("--weights", default=None, help="weights file (default: random init)")
    p.add_argument("--random-init", action="store_true", help="random weights (the default without --weights)")
    p.add_argument("--options", default=None, help="encoder options as JSON, e.g. '{\"interpolation\": \"bilinear\"}'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-sizes", default="32,64,128,256")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000, help="ArcFace classes")
    p.add_argument("--grad-checkpointing", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--freeze-bn", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    baseline = measure(args, "fp32", sizes[0])
    print(json.dumps({"baseline": baseline}))
    rows = []
    for b in sizes:
        try:
            r = measure(args, args.precision, b)
        except torch.OutOfMemoryError:
            print(json.dumps({"batch_size": b, "out_of_memory": True}))
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r["images_per_s_vs_baseline"] = r["images_per_s"] / baseline["images_per_s"]
        r["peak_memory_vs_baseline"] = r["peak_memory_mb"] / baseline["peak_memory_mb"]
        rows.append(r)
        print(json.dumps(r))
    if rows:
        best = rows[-1]
        print(f"{args.encoder} {args.precision}: largest batch that fits {best['batch_size']}, "
              f"{best['images_per_s']:.1f} images/s ({best['images_per_s_vs_baseline']:.2f}x fp32 at batch {sizes[0]}), "
              f"peak memory {best['peak_memory_mb']:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
