"""The DDPM objective and a sampler for looking at what a U-Net learned."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # the targets `ddpm_loss` trains


def ddpm_loss(unet, scheduler, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE at uniformly drawn timesteps (Ho et al. 2020, simple loss) against what the scheduler's
    `prediction_type` says the U-Net predicts: the noise (`epsilon`, what `pretrain` builds), or, for a
    `pretrain.init_from` checkpoint whose scheduler says so, `v_prediction` or `sample`. Always eps before,
    so such a checkpoint was trained on eps and saved with a scheduler that says otherwise."""
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    pred = unet(x_t, t).sample
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"the noise schedule's prediction_type {kind!r} is not one sweep trains "
                         f"({', '.join(PREDICTION_TYPES)})")
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def sample(unet, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """n images in [-1, 1] from pure noise with DDIM (`steps` denoising steps, deterministic for a seed)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    cfg = unet.config
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    side = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]  # a list [s, s] in some configs
    x = torch.randn((n, cfg.in_channels, side, side), generator=g).to(device)
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def image_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid."""
    import math

    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + 2), nrow * (w + 2), c), dtype=np.float32)
    a = ((images.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = a[i]
    img = (grid * 255).round().astype(np.uint8)
    Image.fromarray(img[..., 0] if c == 1 else img).save(path)
