"""DynaMixer as a dense-prediction backbone: a small FPN-style segmentation head on its feature maps.

The backbone is ``timm.create_model(name, features_only=True, img_size=(H, W))``: it returns one
NCHW map per stage, with strides given by ``feature_info.reduction()``, at any input size the
architecture allows (non-square too). The head projects every map to a common width with 1x1
convolutions, upsamples them to the finest map and sums them, then a 3x3 conv and a 1x1 classifier
give per-pixel class logits, upsampled to the input size.

The data are made here: images of randomly coloured discs and squares on a noisy background, and
their masks (0 background, 1 disc, 2 square); colour says nothing about the class, shape does.

    PYTHONPATH=src python examples/segmentation.py --img-size 48 64 --steps 60
    # start the backbone from weights trained at another size (resampled on load):
    PYTHONPATH=src python examples/segmentation.py --checkpoint model_32px.pth

Prints the training loss as it goes and the pixel accuracy / mean IoU on held-out images.
"""
import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import dynamixer  # registers the models
import dynamixer.model

CLASSES = ('background', 'disc', 'square')


def make_shapes(n: int, size: Tuple[int, int], generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, H, W), roughly in [-1, 1], and masks (n, H, W) with values 0, 1, 2."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    images = 0.15 * torch.randn(n, 3, h, w, generator=generator)
    masks = torch.zeros(n, h, w, dtype=torch.long)
    scale = min(h, w)
    for b in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            kind = int(torch.randint(1, 3, (1,), generator=generator))
            r = float(scale * (0.1 + 0.12 * torch.rand(1, generator=generator)))
            cy = float(torch.rand(1, generator=generator)) * h
            cx = float(torch.rand(1, generator=generator)) * w
            if kind == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            else:
                inside = ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
            colour = torch.rand(3, 1, generator=generator) * 2 - 1
            images[b][:, inside] = colour + 0.15 * torch.randn(3, int(inside.sum()), generator=generator)
            masks[b][inside] = kind
    return images, masks


class FPNLiteHead(nn.Module):
    """Per-stage maps [(B, C_i, H_i, W_i)] -> class logits at the finest map's resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in in_channels])
        self.fuse = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.GELU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = sum(
            F.interpolate(lat(f), size=size, mode='bilinear', align_corners=False) if f.shape[-2:] != size else lat(f)
            for lat, f in zip(self.lateral, features))
        return self.classifier(self.fuse(x))


class Segmenter(nn.Module):
    """DynaMixer feature backbone + FPN-lite head: (B, 3, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, model_name: str, img_size: Tuple[int, int], num_classes: int,
                 checkpoint: Optional[str] = None):
        super().__init__()
        kwargs = {}
        if checkpoint:
            # weights trained at any size: checkpoint_filter_fn resamples the generators to img_size.
            # The overlay names the checkpoint's class count so that timm drops its classifier.
            state = dynamixer.unwrap_state_dict(dynamixer.read_checkpoint(checkpoint))
            head = state.get('head.weight')
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(
                file=checkpoint, num_classes=head.shape[0] if head is not None else 0))
        self.backbone = timm.create_model(model_name, features_only=True, img_size=img_size, **kwargs)
        self.head = FPNLiteHead(self.backbone.feature_info.channels(), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, num_classes: int) -> Dict[str, float]:
    model.eval()
    pred = model(images).argmax(1)
    ious = []
    for c in range(num_classes):
        inter = ((pred == c) & (masks == c)).sum().item()
        union = ((pred == c) | (masks == c)).sum().item()
        if union:
            ious.append(inter / union)
    return dict(pixel_acc=(pred == masks).float().mean().item(), miou=sum(ious) / len(ious))


def train(
        model_name: str = 'dynamixer_nano',
        img_size: Tuple[int, int] = (48, 64),
        steps: int = 60,
        batch: int = 8,
        lr: float = 2e-3,
        seed: int = 0,
        checkpoint: Optional[str] = None,
        log_every: int = 10,
        eval_images: int = 32,
) -> Dict[str, object]:
    """Train the segmenter on fresh synthetic batches; returns the losses and held-out metrics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Segmenter(model_name, tuple(img_size), len(CLASSES), checkpoint)
    info = model.backbone.feature_info
    print(f'{model_name} features at {img_size[0]}x{img_size[1]}: ' + ', '.join(
        f'{c}ch/{r}' for c, r in zip(info.channels(), info.reduction())))
    opt = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.05)
    # background pixels dominate: weight the classes by inverse frequency on a sample
    _, sample = make_shapes(64, img_size, torch.Generator().manual_seed(seed + 1))
    freq = torch.bincount(sample.flatten(), minlength=len(CLASSES)).float() + 1
    loss_fn = nn.CrossEntropyLoss(weight=(freq.sum() / freq) / (freq.sum() / freq).mean())
    losses = []
    for step in range(1, steps + 1):
        model.train()
        images, masks = make_shapes(batch, img_size, gen)
        loss = loss_fn(model(images), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            print(f'step {step:4d}  loss {loss.item():.4f}')
    images, masks = make_shapes(eval_images, img_size, torch.Generator().manual_seed(seed + 2))
    metrics = evaluate(model, images, masks, len(CLASSES))
    print(f'held-out: pixel accuracy {100 * metrics["pixel_acc"]:.1f}%, mean IoU {100 * metrics["miou"]:.1f}%')
    return dict(losses=losses, **metrics)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Train a small segmentation head on DynaMixer features (synthetic data).')
    p.add_argument('--model', default='dynamixer_nano')
    p.add_argument('--img-size', type=int, nargs=2, default=(48, 64), metavar=('H', 'W'))
    p.add_argument('--steps', type=int, default=60)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--checkpoint', default=None, help='backbone weights (any training size)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = train(args.model, tuple(args.img_size), args.steps, args.batch, args.lr, args.seed, args.checkpoint)
    losses = out['losses']
    k = max(1, len(losses) // 5)
    print(f'mean loss, first {k} steps {sum(losses[:k]) / k:.4f} -> last {k} steps {sum(losses[-k:]) / k:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
