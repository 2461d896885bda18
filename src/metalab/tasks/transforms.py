"""Image distortions for training: Koch et al. 2015's random affine transforms, and stroke-width
changes of pen drawings.

Applied to a batch of float images on their device: the affine ones in one ``affine_grid`` +
``grid_sample``, the stroke ones with a 3x3 max-pool (grey-level dilation and erosion).
:func:`augment_episode` applies both to a training episode's images (``--augment``, ``--stroke``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metalab.tasks.episodes import Episode

KOCH_SIZE = 105  # Koch's distortion ranges are for 105x105 images


def affine_distort(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    rotation: float = 10.0,
    shear: float = 0.3,
    scale: tuple[float, float] = (0.8, 1.2),
    translation: float = 2.0,
) -> torch.Tensor:
    """Koch's random affine distortion of each image, in one ``affine_grid`` + ``grid_sample``.

    Each of the seven components θ, ρx, ρy, sx, sy, tx, ty is drawn uniformly and applied with
    probability ``p`` (otherwise it is the identity's 0 or 1); the image is scaled, sheared,
    rotated about its centre and translated, with empty space filled with background (0).

    Args:
        images: float ``(B, C, H, W)``, ink > 0 on a 0 background.
        generator: the random generator (on ``images.device``); None: torch's global one.
        p: probability of each component.
        rotation: θ ∈ [-rotation, rotation] degrees.
        shear: ρx, ρy ∈ [-shear, shear].
        scale: sx, sy ∈ [scale[0], scale[1]].
        translation: tx, ty ∈ [-translation, translation] pixels of ``images`` (Koch's ±2 are
            pixels of 105x105 images: pass ``2 * 28 / 105`` for the same shift at 28x28).

    Returns:
        ``(B, C, H, W)`` of ``images``' dtype; an image whose components were all left out is
        returned unchanged (bit for bit).
    """
    b, _, h, w = images.shape
    kw = dict(device=images.device, dtype=images.dtype)
    low = torch.tensor(
        [-rotation, -shear, -shear, scale[0], scale[0], -translation, -translation], **kw
    )
    high = torch.tensor(
        [rotation, shear, shear, scale[1], scale[1], translation, translation], **kw
    )
    identity = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], **kw)
    u = torch.rand(b, 7, generator=generator, **kw)
    on = torch.rand(b, 7, generator=generator, **kw) < p
    theta, rho_x, rho_y, s_x, s_y, t_x, t_y = torch.where(on, low + (high - low) * u, identity).T

    # Forward map in pixels about the centre, y down: p_out = R(θ) Sh(ρ) S(s) p_in + t.
    angle = theta * (math.pi / 180)
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rotate = torch.stack([cos, -sin, sin, cos], -1).view(b, 2, 2)
    shear_ = torch.stack([one, rho_x, rho_y, one], -1).view(b, 2, 2)
    scale_ = torch.stack([s_x, zero, zero, s_y], -1).view(b, 2, 2)
    inverse = torch.linalg.inv(rotate @ shear_ @ scale_)  # (B, 2, 2)
    # affine_grid wants the inverse map (output -> input) in normalised coordinates n = D p.
    d = torch.tensor([2.0 / w, 2.0 / h], **kw)
    linear = d[:, None] * inverse / d  # D A⁻¹ D⁻¹
    offset = -d * (inverse @ torch.stack([t_x, t_y], -1)[..., None]).squeeze(-1)  # -D A⁻¹ t
    grid = F.affine_grid(torch.cat([linear, offset[..., None]], -1), list(images.shape), False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(on.any(1).view(b, 1, 1, 1), warped, images)


def stroke_width(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Thicker or thinner pen strokes: each image, with probability ``p``, moves a random
    fraction ``s ~ U(0, 1)`` of the way to its 3x3 grey-level dilation (max-pool; strokes one
    pixel wider on each side) or, with equal chance, its erosion (min-pool), in place of a
    pen of another width. Partial steps matter at 28x28, where a full erosion erases strokes
    one or two pixels wide. Ink > 0 on a 0 background; the others are returned unchanged."""
    b = images.shape[0]
    kw = dict(device=images.device, dtype=images.dtype)
    on = torch.rand(b, generator=generator, **kw) < p
    thicker = torch.rand(b, generator=generator, **kw) < 0.5
    amount = torch.rand(b, generator=generator, **kw)
    dilated = F.max_pool2d(images, 3, 1, 1)
    eroded = -F.max_pool2d(-images, 3, 1, 1)
    target = torch.where(thicker.view(b, 1, 1, 1), dilated, eroded)
    changed = images + amount.view(b, 1, 1, 1) * (target - images)
    return torch.where(on.view(b, 1, 1, 1), changed, images)


def augment_images(
    images: torch.Tensor,
    affine: float = 0.0,
    stroke: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Koch's affine distortions (each component with probability ``affine``; translations
    scaled from his 105x105 pixels to ``images``' size), then stroke-width changes (with
    probability ``stroke``), drawn from ``generator`` (None: torch's global one, part of a
    training checkpoint). Any leading shape ``(..., C, H, W)``."""
    if not (affine or stroke):
        return images
    shape = images.shape
    x = images.reshape(-1, *shape[-3:])
    if affine:
        x = affine_distort(x, generator, p=affine, translation=2.0 * shape[-1] / KOCH_SIZE)
    if stroke:
        x = stroke_width(x, generator, p=stroke)
    return x.reshape(shape)


def augment_episode(episode: Episode, affine: float = 0.0, stroke: float = 0.0) -> Episode:
    """A training episode (or task batch) with its support and query images augmented
    independently (:func:`augment_images`); labels unchanged."""
    if not (affine or stroke):
        return episode
    fields = list(episode.tensors())
    fields[0] = augment_images(episode.support_x, affine, stroke)
    fields[2] = augment_images(episode.query_x, affine, stroke)
    return type(episode)(*fields)
