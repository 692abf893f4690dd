r"""Exact distances of the few feature/prototype pairs where the expanded formula cancels.

:mod:`dismax_plugin.distances` computes :math:`B \times C` distances from one matrix product; for pairs
flagged as near (their squared distance small next to the squared norms) it calls these functions, which
work on the :math:`K` flagged pairs only: values and gradient contributions from the explicit difference
:math:`e = f - p` (or :math:`\hat f - \hat p`), gathered in chunks (never a :math:`B \times C \times D`
tensor) and evaluated in float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import torch

__all__ = [
    "NORM_EPS",
    "add_pair_gradients",
    "exact_differences",
    "exact_dtype",
    "flags",
    "pair_terms",
    "per_distance",
    "root_and_recompute",
]

NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize
_CHUNK_ELEMENTS = 1 << 19  # elements of one float64 work buffer (4 MiB)
_KEEP_ELEMENTS = 1 << 24  # the differences e of at most this many elements are kept for the backward (64 MiB)


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


def _unit_rows(v: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``v / max(|v|, eps)`` of gathered rows, in ``work`` (float64), in place of the converted copy."""
    v = v.to(work, copy=True)
    return v.mul_(torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min_(NORM_EPS).reciprocal_())


def exact_differences(x, prototypes, rows, cols, normalized: bool, keep: bool):
    r"""Exact distances :math:`d_k` (K, ``x.dtype``) of the flagged pairs from their explicit differences
    :math:`e_k = f - p` or :math:`\hat f - \hat p`, evaluated in float64 in chunks of pairs, and :math:`e`
    itself (K x D, ``x.dtype``) when ``keep`` and it is not larger than :data:`_KEEP_ELEMENTS` (else None:
    :func:`add_pair_gradients` recomputes it)."""
    count, dim = rows.numel(), x.shape[1]
    work = exact_dtype(x.device)
    keep = keep and count * dim <= _KEEP_ELEMENTS
    exact = torch.empty(count, dtype=x.dtype, device=x.device)
    kept = torch.empty(count, dim, dtype=x.dtype, device=x.device) if keep else None
    for part in _chunks(count, dim):
        xr, pc = x.index_select(0, rows[part]), prototypes.index_select(0, cols[part])
        if normalized:
            e = _unit_rows(xr, work).sub_(_unit_rows(pc, work))
        else:
            e = xr.to(work, copy=True).sub_(pc.to(work))
        exact[part] = torch.linalg.vector_norm(e, dim=1)
        if kept is not None:
            kept[part] = e
    return exact, kept


def add_pair_gradients(grads, indices, weights, kept, x, prototypes, rows, cols, normalized: bool) -> None:
    r"""``grad.index_add_(0, index, weight[:, None] * e)`` for each (grad, index, weight) with a grad (not
    None); ``e`` (K x D) as kept by :func:`exact_differences`, else recomputed in chunks."""
    jobs = [(g, i, w) for g, i, w in zip(grads, indices, weights) if g is not None]
    if not jobs:
        return
    if kept is not None:
        for grad, index, weight in jobs:
            grad.index_add_(0, index, kept * weight.unsqueeze(1))
        return
    for part in _chunks(rows.numel(), x.shape[1]):
        sub = rows[part], cols[part]
        _, e = exact_differences(x, prototypes, *sub, normalized, keep=True)
        for grad, index, weight in jobs:
            grad.index_add_(0, index[part], e * weight[part].unsqueeze(1))


def flags(d_sq: torch.Tensor, quick_bound, *extra: torch.Tensor) -> list:
    """``[min(d_sq) <= quick_bound, *extra]`` as Python bools with one host sync (one ``.tolist()``)."""
    if not d_sq.numel():
        return [False] + [bool(e) for e in extra]
    near = d_sq.amin() <= quick_bound
    return torch.stack((near, *extra)).tolist() if extra else [bool(near)]


def root_and_recompute(d, x, prototypes, near: torch.Tensor | None, normalized: bool, keep: bool):
    """``d`` holds d^2: take square roots, overwrite the entries flagged by the mask ``near`` (None: none)
    with their exact values; return the flagged pairs' indices and their differences (see
    :func:`exact_differences`; None when not kept)."""
    rows, cols = _no_pairs(d.device) if near is None else _pair_indices(near)
    d.sqrt_()  # negative squares are always flagged (the bounds are >= 0) and overwritten below
    kept = None
    if rows.numel():
        d[rows, cols], kept = exact_differences(x, prototypes, rows, cols, normalized, keep)
    return rows, cols, kept


def per_distance(upstream: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``upstream / d``, 0 where ``d = 0`` (the subgradient 0 of a norm at 0)."""
    return torch.where(d > 0, upstream / d, torch.zeros_like(d))


def pair_terms(upstream, d, a, q, ux, up, x_normal, p_normal):
    r"""Gradient terms of the K flagged pairs (``upstream`` :math:`= s V`, exact ``d``, and the pairs' row and
    column data): the weights of :math:`e` for :math:`\nabla_x` (:math:`a\,g/d`) and :math:`\nabla_P`
    (:math:`-q\,g/d`), and the parts along :math:`x` and :math:`p`, :math:`-a^2 (g/d)\,\hat x \cdot e` and
    :math:`q^2 (g/d)\,\hat p \cdot e` with :math:`\hat x \cdot e = (d^2 + |\hat x|^2 - |\hat p|^2)/2`,
    :math:`\hat p \cdot e = (|\hat x|^2 - |\hat p|^2 - d^2)/2` (none for vectors at the eps floor)."""
    k = per_distance(upstream, d)
    d_sq = d.square()
    unit_gap = ux - up  # first: 1 + d^2 would round d^2 away in float32
    along_x = (unit_gap + d_sq).mul_(a.square() * k * -0.5) * x_normal
    along_p = (unit_gap - d_sq).mul_(q.square() * k * 0.5) * p_normal
    return k * a, k * -q, along_x, along_p
