"""Augmentations that suit micrographs: organisms have no canonical orientation, so flips and 90-degree
rotations are label-preserving and add no interpolation artefacts."""

from __future__ import annotations

import torch


def flips_and_rotations(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply an independent random element of the dihedral group D4 to each image of (B, C, H, W)."""
    b = x.shape[0]
    hflip = torch.rand(b, generator=generator) < 0.5
    k = torch.randint(0, 4, (b,), generator=generator)
    x = torch.where(hflip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    out = x.clone()
    for quarter in (1, 2, 3):
        sel = (k == quarter).nonzero().flatten().to(x.device)
        if len(sel):
            out[sel] = torch.rot90(x[sel], quarter, dims=(-2, -1))
    return out
