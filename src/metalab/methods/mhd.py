"""Modified Hausdorff distance baseline — Dubuisson & Jain, "A modified Hausdorff distance for object
matching", ICPR 1994; the one-shot baseline of Lake, Salakhutdinov & Tenenbaum, Science 2015.

As in Lake's demo (``python/one-shot-classification/demo_classification.py`` in
github.com/brendenlake/omniglot): an image is the set of its ink pixels' (row, column) coordinates,
centred on their mean; ``MHD(A, B) = max(mean_a min_b |a - b|, mean_b min_a |a - b|)``; a query goes
to the class with the smallest distance, ties to the first class. No training.

Comparing every ink pixel with every other (``torch.cdist``, about 900 x 900 points per pair) takes
about a second per 20-way run at 105x105 on two CPU cores, so :func:`mhd_matrix` computes the same
distances on the pixel grid instead, about ten times faster: the squared distance to a set of pixels is
``min over rows of (dy^2 + dx^2 to the nearest ink in that row)``, and the nearest ink in a row is the
last ink column left of the point or the first one right of it, both read from per-row tables.
"""

from __future__ import annotations

import torch
from torch import nn

from metalab.errors import DataError


def modified_hausdorff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The modified Hausdorff distance (Dubuisson & Jain 1994) between point sets ``(n, 2), (m, 2)``.

    The reference definition, on the points as given; :func:`mhd_matrix` centres images first.
    """
    d = torch.cdist(a.double(), b.double())
    return max(d.min(1).values.mean().item(), d.min(0).values.mean().item())


def ink_points(image: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` ink mask -> float64 ``(n, 2)`` (row, column) of its ink pixels, centred on their mean."""
    points = image.nonzero().double()
    return points - points.mean(0)


def mhd_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Modified Hausdorff distances between centred images: bool ``(n, H, W), (m, H', W') -> (n, m)``.

    Equal to :func:`modified_hausdorff` on :func:`ink_points` up to float32 rounding (about 1e-6).
    """
    for images in (a, b):
        if not images.flatten(1).any(1).all():
            raise DataError(
                "an image has no ink (no pixel > 0.5): MHD needs at least one ink pixel"
            )
    return torch.maximum(_mean_nearest(a, b), _mean_nearest(b, a).T)


def _centroids(ink: torch.Tensor) -> torch.Tensor:
    """bool ``(n, H, W)`` -> float64 ``(n, 2)`` mean (row, column) of each image's ink."""
    weights = ink.double()
    total = weights.sum((1, 2))
    rows = torch.arange(ink.shape[1], dtype=torch.float64, device=ink.device)
    cols = torch.arange(ink.shape[2], dtype=torch.float64, device=ink.device)
    return torch.stack([(weights.sum(2) @ rows) / total, (weights.sum(1) @ cols) / total], dim=1)


def _row_tables(ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(n, H, W)`` -> float32 ``(n, H, W + 1)`` tables ``left, right``.

    ``left[..., j]`` is the last ink column ``< j`` of the row, ``right[..., j]`` the first ink column
    ``>= j``; ``-inf`` / ``inf`` where there is none. Columns left of the image read index 0 and
    columns right of it index ``W``, which hold exactly their answers.
    """
    n, h, w = ink.shape
    col = torch.arange(w, dtype=torch.float32, device=ink.device)
    inf = torch.tensor(torch.inf, device=ink.device)
    last = torch.where(ink, col, -inf).cummax(2).values
    first = torch.where(ink, col, inf).flip(2).cummin(2).values.flip(2)
    none = torch.full((n, h, 1), torch.inf, device=ink.device)
    return torch.cat([-none, last], 2), torch.cat([first, none], 2)


def _mean_nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 ``(n, m)``: mean over the centred ink of ``a[i]`` of the distance to the nearest centred
    ink pixel of ``b[j]``."""
    rows_with_ink = b.any(2).any(0).nonzero()[:, 0]
    top, bottom = int(rows_with_ink[0]), int(rows_with_ink[-1]) + 1  # other rows are never nearest
    left, right = _row_tables(b[:, top:bottom])
    width = b.shape[2]
    rows = torch.arange(top, bottom, dtype=torch.float32, device=b.device)
    support = torch.arange(len(b), device=b.device)[:, None]
    means_a, means_b = _centroids(a), _centroids(b)
    out = torch.empty(len(a), len(b), dtype=torch.float64, device=a.device)
    for i, image in enumerate(a):
        # A pixel p of a[i] sits at p + shift in b[j]'s frame; split the shift into a whole step and
        # a fraction in [0, 1) so that lookups use integer columns: p + shift = (p + whole) - frac.
        shift = means_b - means_a[i]
        whole = shift.ceil()
        frac = whole - shift
        grid = image.nonzero()[None] + whole.long()[:, None]  # (m, n, 2)
        lo, hi = int(grid[..., 1].min()), int(grid[..., 1].max())
        cols = torch.arange(lo, hi + 1, device=b.device)
        index = cols.clamp(0, width)
        steps, fx = cols.float(), frac[:, 1, None, None].float()
        # Squared horizontal distance from column (c - fx) to the nearest ink of each row of b[j];
        # integer differences first, so float32 only rounds the fraction.
        dx2 = (
            torch.minimum(
                ((steps - left.index_select(2, index)) - fx).square(),
                ((right.index_select(2, index) - steps) + fx).square(),
            )
            .transpose(1, 2)
            .contiguous()
        )  # (m, columns, rows): rows last, for the gather below
        flat = (grid[..., 1] - lo + support * len(cols)).flatten()
        d2 = dx2.flatten(0, 1).index_select(0, flat).view(*grid.shape[:2], -1)  # (m, n, rows)
        dy = (grid[..., 0] - frac[:, 0, None]).float()[..., None] - rows
        d2 = d2.addcmul_(dy, dy).amin(2)
        out[i] = d2.double().sqrt().mean(1)
    return out


class MHD(nn.Module):
    """Training-free nearest-neighbour classifier under the modified Hausdorff distance."""

    name = "mhd"

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """float64 logits ``(queries, ways)``: minus the MHD to the class's nearest support image.

        Args:
            support_x: ``(n, 1, H, W)`` images with ink high; pixels > 0.5 are ink.
            support_y: ``(n,)`` labels ``0..ways-1``.
            query_x: ``(q, 1, H, W)`` images like ``support_x``.
        """
        ways = int(support_y.max()) + 1
        distances = mhd_matrix(query_x[:, 0] > 0.5, support_x[:, 0] > 0.5)  # (q, n)
        logits = torch.full(
            (len(query_x), ways), -torch.inf, dtype=torch.float64, device=distances.device
        )
        labels = support_y.to(distances.device).expand(len(query_x), -1)
        return logits.scatter_reduce(1, labels, -distances, "amax")
