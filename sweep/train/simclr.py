"""SimCLR pieces (Chen et al. 2020), pure torch: two augmented views per image, a projection head and the
NT-Xent loss, with negatives gathered from every DDP worker when one runs.

The views suit greyscale micrographs: random resized crops, the dihedral group D4 (flips and 90-degree
rotations: organisms have no canonical orientation), brightness / contrast / gamma jitter, a light Gaussian
blur and pixel noise. No hue or saturation jitter (nothing to jitter in grey) and no inversion (a bright
background and a dark organism is part of what the image is). Everything is batched, runs on the images'
device and draws from one ``torch.Generator``, so a seeded run is reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from sweep.train.augment import flips_and_rotations


@dataclasses.dataclass(frozen=True)
class ViewAugment:
    scale: tuple[float, float] = (0.25, 1.0)  # crop area, as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio
    jitter_p: float = 0.8
    brightness: float = 0.4  # multiply intensities by U(1 - b, 1 + b)
    contrast: float = 0.4  # scale deviations from the image mean by U(1 - c, 1 + c)
    gamma: float = 0.3  # raise to exp(U(-g, g))
    blur_p: float = 0.5
    noise_std: float = 0.02  # in [0, 1] intensity units

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment_view(x, self, generator)


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def random_resized_crop(x: torch.Tensor, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A random crop of each image (area fraction in ``scale``, aspect ratio in ``ratio``) resized back to
    the input size (bilinear), as one batched ``grid_sample``."""
    b = x.shape[0]
    area = _uniform(b, scale[0], scale[1], generator, "cpu")
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, "cpu")
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # centre, normalised coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (B,), separable, reflect-padded."""
    b, c, hgt, wid = x.shape
    radius = max(1, int(math.ceil(2 * float(sigma.max()))))
    radius = min(radius, (min(hgt, wid) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.device, x.dtype)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, hgt, wid)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def augment_view(x: torch.Tensor, aug: ViewAugment = ViewAugment(),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image of (B, C, H, W) in [-1, 1]; the result is in [-1, 1] too."""
    b, dev = x.shape[0], x.device
    x = random_resized_crop(x, aug.scale, aug.ratio, generator)
    x = flips_and_rotations(x, generator)
    v = (x + 1) / 2  # intensities in [0, 1]
    jitter = (torch.rand(b, generator=generator) < aug.jitter_p).to(dev).view(-1, 1, 1, 1)
    bright = _uniform(b, 1 - aug.brightness, 1 + aug.brightness, generator, dev).view(-1, 1, 1, 1)
    contrast = _uniform(b, 1 - aug.contrast, 1 + aug.contrast, generator, dev).view(-1, 1, 1, 1)
    gamma = torch.exp(_uniform(b, -aug.gamma, aug.gamma, generator, dev)).view(-1, 1, 1, 1)
    j = (v * bright).clamp(0, 1)
    mean = j.mean(dim=(1, 2, 3), keepdim=True)
    j = ((j - mean) * contrast + mean).clamp(0, 1)
    j = j.clamp_min(1e-6) ** gamma
    v = torch.where(jitter, j, v)
    blur = (torch.rand(b, generator=generator) < aug.blur_p).to(dev).view(-1, 1, 1, 1)
    side = min(x.shape[-2:])
    sigma = _uniform(b, 0.1, max(0.1, min(2.0, 0.05 * side)), generator, "cpu")
    v = torch.where(blur, gaussian_blur(v, sigma), v)
    if aug.noise_std:
        noise = torch.randn(v.shape, generator=generator).to(dev) * aug.noise_std
        v = v + noise
    return (v.clamp(0, 1) * 2 - 1).contiguous()


def two_views(x: torch.Tensor, aug: ViewAugment = ViewAugment(),
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return augment_view(x, aug, generator), augment_view(x, aug, generator)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: Linear - BN - ReLU - Linear, on the backbone's pooled features."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SimCLRModel(nn.Module):
    """Backbone (a classifier-free ResNet: ``forward`` returns the pooled features) + projection head.
    Only ``backbone`` is kept as the encoder; the head is discarded after training, as in the paper."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(feature_dim, max(feature_dim, projection_dim), projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every worker's gradient for this worker's slice (gloo and NCCL alike:
    only all_gather and all_reduce are used). Needs the same batch size on every worker."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n: (ctx.rank + 1) * ctx.n]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent: for each of the 2N projections, cross-entropy of picking its other view among the other
    2N - 1 (cosine similarity / temperature). ``z1[i]`` and ``z2[i]`` are the two views of image i.

    Under DDP (``gather`` and a process group of more than one worker) the negatives are every worker's
    projections (the global batch, as in the paper); the loss is this worker's mean, and DDP's gradient
    averaging then gives exactly the gradient of the global mean.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    if gather and _distributed():
        import torch.distributed as dist

        k1, k2 = _GatherWithGrad.apply(z1), _GatherWithGrad.apply(z2)
        offset = dist.get_rank() * n
    else:
        k1, k2, offset = z1, z2, 0
    total = k1.shape[0]
    queries = torch.cat([z1, z2])  # (2n, D)
    keys = torch.cat([k1, k2])  # (2 * total, D): first views of everyone, then second views
    logits = queries @ keys.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + total])
    pos_idx = torch.cat([idx + total, idx])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_idx), torch.tensor(True, device=z1.device)),
        float("-inf"))
    return F.cross_entropy(logits, pos_idx)
