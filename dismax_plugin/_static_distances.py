r"""The plain differentiable distance expressions: the static-shape path of :mod:`dismax_plugin.distances`.

Tracing, ``torch.export``, ``torch.compile``, TorchScript, torch.func transforms, autocast and float16/bfloat16
tensors evaluate the expanded formula with ordinary differentiable operations (the matrix product in the
autocast dtype, the rest in at least float32) and recompute each row's :math:`\min(C, 4)` nearest prototypes
exactly from the explicit difference; see :mod:`dismax_plugin.distances` for what is exact and the bound on
the other pairs. Everything here is scriptable.
"""

from __future__ import annotations

import torch

from ._near_pairs import exact_dtype as _exact_dtype

__all__ = ["euclidean_reference", "norm_eps", "normalized_reference", "safe_sqrt", "scaled"]

_HALF_NORM_EPS = 2.0**-8  # float16: 1/eps (the gradient scale at a zero row) leaves ~256x headroom below 65504


def norm_eps(dtype: torch.dtype) -> float:
    # literals (= _HALF_NORM_EPS, NORM_EPS of _near_pairs) keep this scriptable
    return 0.00390625 if dtype == torch.float16 else 1e-12


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root of ``max(x, 0)`` whose gradient is 0 (not inf/NaN) where ``x <= 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def scaled(d: torch.Tensor, scale: torch.Tensor | float | None, add_mean: bool, inplace: bool) -> torch.Tensor:
    """``scale * (d + mean_j d)`` (``add_mean``) or ``scale * d``; ``scale`` a number, a one-element tensor or
    None; ``inplace``: ``d`` may be overwritten."""
    if add_mean:
        mean = d.mean(dim=1, keepdim=True)
        d = d.add_(mean) if inplace else d + mean
        inplace = True  # a new tensor now, or d itself
    if scale is None:
        return d
    if isinstance(scale, float):
        return d.mul_(scale) if inplace else d * scale
    scale = scale.to(d.dtype)
    return d.mul_(scale) if inplace else d * scale


def _nearest_exact(xw, pw, d_sq, x_eps: float, p_eps: float, normalized: bool):
    """Indices (B x k) of each row's k = min(C, 4) nearest prototypes by ``d_sq`` and their distances
    from the explicit differences (B x k, differentiable, float64 or float32 on MPS, in ``xw``'s dtype)."""
    if torch.jit.is_tracing():  # torch.jit.trace records min(4, C) as a data-dependent branch: nearest only
        nearest = d_sq.detach().argmin(dim=1, keepdim=True)
    else:
        nearest = d_sq.detach().topk(min(4, d_sq.shape[1]), dim=1, largest=False).indices
    work = _exact_dtype(xw.device)
    xe = xw.to(work).unsqueeze(1)  # B x 1 x D
    pe = pw.to(work)[nearest]  # B x k x D
    if normalized:
        xe = xe / torch.linalg.vector_norm(xe, dim=2, keepdim=True).clamp_min(x_eps)
        pe = pe / torch.linalg.vector_norm(pe, dim=2, keepdim=True).clamp_min(p_eps)
    return nearest, torch.linalg.vector_norm(xe - pe, dim=2).to(xw.dtype)


def euclidean_reference(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The plain differentiable expression; each row's nearest prototypes recomputed exactly (static shapes)."""
    products = x @ prototypes.t()
    work = torch.promote_types(products.dtype, torch.float32)
    xw, pw = x.to(work), prototypes.to(work)
    x_sq = xw.pow(2).sum(dim=1, keepdim=True)
    p_sq = pw.pow(2).sum(dim=1)
    d_sq = x_sq + p_sq.unsqueeze(0) - 2.0 * products.to(work)
    nearest, exact = _nearest_exact(xw, pw, d_sq, 0.0, 0.0, False)
    return safe_sqrt(d_sq).scatter(1, nearest, exact)



def normalized_reference(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The plain differentiable expression; each row's nearest prototypes recomputed exactly (static shapes)."""
    work = torch.promote_types(torch.promote_types(x.dtype, prototypes.dtype), torch.float32)
    xw, pw = x.to(work), prototypes.to(work)
    x_eps, p_eps = norm_eps(x.dtype), norm_eps(prototypes.dtype)
    x_norm = safe_sqrt(xw.pow(2).sum(dim=1, keepdim=True))
    p_norm = safe_sqrt(pw.pow(2).sum(dim=1))
    # Normalise in the work dtype (the floor is not representable in float16), multiply in x's dtype.
    unit_x = (xw / x_norm.clamp_min(x_eps)).to(x.dtype)
    products = (unit_x @ prototypes.t()).to(work)
    cosine = products / p_norm.clamp_min(p_eps).unsqueeze(0)
    # |f^|^2: 1 above the floor, (|f| / eps)^2 below it (F.normalize's value, not only 0 or 1)
    x_unit = (x_norm / x_norm.clamp_min(x_eps)).square()
    p_unit = (p_norm / p_norm.clamp_min(p_eps)).square().unsqueeze(0)
    d_sq = x_unit + p_unit - 2.0 * cosine
    nearest, exact = _nearest_exact(xw, pw, d_sq, x_eps, p_eps, True)
    return safe_sqrt(d_sq).scatter(1, nearest, exact)
