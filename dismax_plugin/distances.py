r"""Distances from feature vectors to class prototypes, computed with matrix products.

Everything here is a pure function of tensors. The squared distance is expanded as

.. math::

    \lVert f - p_j \rVert^2 = \lVert f \rVert^2 + \lVert p_j \rVert^2 - 2\, f \cdot p_j ,

so the only :math:`B \times C \times D` work is one matrix product, as in ``nn.Linear``; no
:math:`B \times C \times D` difference tensor is built. The prototype side is handled by
:class:`_ProductsAndSquaredNorms`, whose backward fuses the gradient of :math:`\lVert p_j \rVert^2`
into the matrix-product gradient, so training touches the :math:`C \times D` prototype matrix about
as often as a linear layer touches its weight.
"""

from __future__ import annotations

import math

import torch

__all__ = ["euclidean_distances", "normalized_distances", "safe_sqrt"]

_NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root of ``max(x, 0)`` whose gradient is 0 (not inf/NaN) where ``x <= 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class _ProductsAndSquaredNorms(torch.autograd.Function):
    """``(x @ P.T, (P * P).sum(1))`` with a backward that writes the prototype gradient once.

    ``grad_P = 2 * g_sq[:, None] * P + g_S.T @ x`` is assembled in place (one scaled copy of ``P``
    followed by an accumulating ``addmm_``) instead of autograd's separate tensors and sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, prototypes: torch.Tensor):
        ctx.save_for_backward(x, prototypes)
        return x @ prototypes.t(), prototypes.pow(2).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_products, grad_sq_norms):
        x, prototypes = ctx.saved_tensors
        grad_x = grad_p = None
        if grad_products is not None:
            grad_products = grad_products.to(prototypes.dtype)
        if ctx.needs_input_grad[0] and grad_products is not None:
            grad_x = grad_products @ prototypes
        if ctx.needs_input_grad[1]:
            if grad_sq_norms is not None:
                grad_p = (2.0 * grad_sq_norms.to(prototypes.dtype)).unsqueeze(1) * prototypes
                if grad_products is not None:
                    grad_p.addmm_(grad_products.t(), x.to(prototypes.dtype))
            elif grad_products is not None:
                grad_p = grad_products.t() @ x.to(prototypes.dtype)
        return grad_x, grad_p


def _use_fused(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    # The fused backward only matters when autograd will differentiate through the prototypes in eager
    # mode; tracing, export and autocast get the plain differentiable expression.
    if not (torch.is_grad_enabled() and (x.requires_grad or prototypes.requires_grad)):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if x.dtype != prototypes.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    return True


def _products_and_sq_norms(x: torch.Tensor, prototypes: torch.Tensor):
    if _use_fused(x, prototypes):
        return _ProductsAndSquaredNorms.apply(x, prototypes)
    return x @ prototypes.t(), prototypes.pow(2).sum(dim=1)


def euclidean_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    r"""Euclidean distances :math:`\lVert f_b - p_j \rVert`.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :return: :math:`B \times C`, non-negative, with a finite gradient where a distance is 0.
    """
    products, proto_sq = _products_and_sq_norms(features, prototypes)
    feat_sq = features.pow(2).sum(dim=1, keepdim=True).to(products.dtype)
    return safe_sqrt(feat_sq + proto_sq.to(products.dtype).unsqueeze(0) - 2.0 * products)


def normalized_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    r"""Distances between L2-normalised vectors, :math:`\lVert \hat f_b - \hat p_j \rVert \in [0, 2]`.

    With :math:`\hat v = v / \max(\lVert v \rVert, \epsilon)` (as ``F.normalize``),
    :math:`\lVert \hat f - \hat p \rVert^2 = 2 - 2\, \hat f \cdot p / \lVert p \rVert`; the prototypes are
    never copied in normalised form.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :return: :math:`B \times C`
    """
    feat_norm = safe_sqrt(features.pow(2).sum(dim=1, keepdim=True)).clamp_min(_NORM_EPS)
    unit_features = features / feat_norm
    products, proto_sq = _products_and_sq_norms(unit_features, prototypes)
    proto_norm = safe_sqrt(proto_sq.to(products.dtype)).clamp_min(_NORM_EPS)
    cosine = products / proto_norm.unsqueeze(0)
    # A zero vector normalises to 0, so its squared distance is |f^|^2 + |p^|^2 - 2 cos, not 2 - 2 cos.
    feat_unit_sq = (feat_norm > _NORM_EPS).to(products.dtype)
    proto_unit_sq = (proto_norm > _NORM_EPS).to(products.dtype).unsqueeze(0)
    return safe_sqrt(feat_unit_sq + proto_unit_sq - 2.0 * cosine)


SQRT2 = math.sqrt(2.0)
