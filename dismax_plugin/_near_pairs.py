r"""Exact distances of the few feature/prototype pairs where the expanded formula cancels.

:mod:`dismax_plugin.distances` computes :math:`B \times C` distances from one matrix product; for pairs
flagged as near (their squared distance small next to the squared norms) it calls these functions, which
work on the :math:`K` flagged pairs only: values and gradient contributions from the explicit difference
:math:`e = f - p` (or :math:`\hat f - \hat p`), gathered in chunks (never a :math:`B \times C \times D`
tensor) and evaluated in float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import torch

__all__ = ["NORM_EPS", "add_exact_gradients", "exact_dtype", "flags", "root_and_recompute"]

NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize
_CHUNK_ELEMENTS = 1 << 19  # elements of one float64 work buffer (4 MiB)


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the explicit-difference recompute: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _pair_indices(near: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the True entries of the B x C mask ``near``."""
    count = int(torch.count_nonzero(near))
    # nonzero() on CPU reserves room for every element (B*C int64 pairs): ask for the `count` found only
    nonzero_static = getattr(torch, "nonzero_static", None)
    flat = near.view(-1)
    flat = (nonzero_static(flat, size=count) if nonzero_static is not None else flat.nonzero()).squeeze(1)
    columns = near.shape[1]
    return torch.div(flat, columns, rounding_mode="floor"), flat.remainder(columns)


def _no_pairs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty


def _chunks(count: int, dim: int):
    step = max(1, _CHUNK_ELEMENTS // max(dim, 1))
    return (slice(start, start + step) for start in range(0, count, step))


def _unit_rows(v: torch.Tensor, work: torch.dtype):
    """``(v / max(|v|, eps), 1 / max(|v|, eps), |v| > eps)`` of gathered rows, in ``work``."""
    v = v.to(work)
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    inverse = norm.clamp_min(NORM_EPS).reciprocal_()
    return v * inverse, inverse, norm > NORM_EPS


def _pair_differences(x, prototypes, rows, cols, part, normalized: bool):
    """Explicit differences ``e`` (K' x D, float64) of one chunk of pairs and the rows' unit data."""
    work = exact_dtype(x.device)
    xr, pc = x.index_select(0, rows[part]), prototypes.index_select(0, cols[part])
    if not normalized:
        return xr.to(work) - pc.to(work), None
    xh, a, x_normal = _unit_rows(xr, work)
    ph, q, p_normal = _unit_rows(pc, work)
    return xh - ph, (xh, a, x_normal, ph, q, p_normal)


def _exact_values(x, prototypes, rows, cols, normalized: bool) -> torch.Tensor:
    """Distances of the flagged pairs from their explicit differences (float64), cast to ``x.dtype``."""
    exact = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    for part in _chunks(rows.numel(), x.shape[1]):
        e, _ = _pair_differences(x, prototypes, rows, cols, part, normalized)
        exact[part] = torch.linalg.vector_norm(e, dim=1)
    return exact


def add_exact_gradients(x, prototypes, rows, cols, upstream, grad_x, grad_p, normalized: bool) -> None:
    r"""Add the flagged pairs' gradients ``upstream_k * dd_k/dx``, ``... dd_k/dp`` (from the explicit
    differences, float64) into ``grad_x`` / ``grad_p`` (either may be None); 0 where ``d = 0``."""
    for part in _chunks(rows.numel(), x.shape[1]):
        e, unit = _pair_differences(x, prototypes, rows, cols, part, normalized)
        d = torch.linalg.vector_norm(e, dim=1, keepdim=True)
        k = (upstream[part].unsqueeze(1).to(e.dtype) / d).masked_fill_(d == 0, 0.0)
        if unit is None:
            gx, gp = e * k, e * -k
        else:  # tangent projections; the scale of a row at the eps floor is constant
            xh, a, x_normal, ph, q, p_normal = unit
            gx = (e - xh * ((xh * e).sum(1, keepdim=True) * x_normal)).mul_(k * a)
            gp = (e - ph * ((ph * e).sum(1, keepdim=True) * p_normal)).mul_(k * -q)
        if grad_x is not None:
            grad_x.index_add_(0, rows[part], gx.to(grad_x.dtype))
        if grad_p is not None:
            grad_p.index_add_(0, cols[part], gp.to(grad_p.dtype))


def flags(d_sq: torch.Tensor, quick_bound, *extra: torch.Tensor) -> list:
    """``[min(d_sq) <= quick_bound, *extra]`` as Python bools with one host sync (one ``.tolist()``)."""
    if not d_sq.numel():
        return [False] + [bool(e) for e in extra]
    near = d_sq.amin() <= quick_bound
    return torch.stack((near, *extra)).tolist() if extra else [bool(near)]


def root_and_recompute(d, x, prototypes, near: torch.Tensor | None, normalized: bool):
    """``d`` holds d^2: take square roots, overwrite the entries flagged by the mask ``near`` (None: none)
    with their exact values; return the flagged pairs' indices."""
    rows, cols = _no_pairs(d.device) if near is None else _pair_indices(near)
    d.sqrt_()  # negative squares are always flagged (the bounds are >= 0) and overwritten below
    if rows.numel():
        d[rows, cols] = _exact_values(x, prototypes, rows, cols, normalized)
    return rows, cols
