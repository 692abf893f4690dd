r"""Distances from feature vectors to class prototypes, computed with matrix products.

Everything here is a pure function of tensors. The squared distance is expanded as

.. math::

    \lVert f - p_j \rVert^2 = \lVert f \rVert^2 + \lVert p_j \rVert^2 - 2\, f \cdot p_j ,

so the only :math:`B \times C \times D` work is one matrix product, as in ``nn.Linear``; no
:math:`B \times C \times D` difference tensor is built and no normalised copy of the prototypes is made.
Both functions take an optional one-element ``scale`` (and :func:`normalized_distances` ``add_mean``) so
that a head's logits :math:`s\,d` or :math:`s\,(d_j + \frac1C \sum_k d_k)` come out of the same node
without extra passes over the :math:`B \times C` matrix.

**Fused path.** In eager float32/float64 (no autocast, no torch.func transform, not tracing) the whole
distance, scale and mean is one autograd node (:class:`_EuclideanDistances`, :class:`_NormalizedDistances`)
whose hand-written backward needs one matrix product per input, one row-scaled pass over the :math:`C
\times D` prototypes (the part of their gradient along themselves) and a few :math:`B \times C` passes;
the forward reads the prototypes once more for their norms. Under autocast, for float16/bfloat16 tensors,
under torch.func transforms and while tracing, scripting, exporting or compiling, the same formula is
evaluated with plain differentiable operations (the matrix product in the autocast dtype, the rest in at
least float32).

**Exactness near a prototype (fused path).** The expansion cancels when :math:`d` is small next to
:math:`\lVert f \rVert + \lVert p \rVert` (the regime IsoMax training drives features into). Every entry
with :math:`d^2 \le \rho\,(\lVert f \rVert^2 + \lVert p \rVert^2)` (Euclidean) or :math:`d^2 \le 2\rho`
(normalised, where :math:`\lVert \hat f \rVert^2 + \lVert \hat p \rVert^2 \le 2`), :math:`\rho = 10^{-2}`,
is recomputed as the norm of the explicit difference :math:`f - p` or :math:`\hat f - \hat p`, evaluated
in float64 (float32 on MPS) for the :math:`K` flagged pairs, in chunks. The backward drops those pairs from
the matrix-product terms and adds their exact gradients from the same difference :math:`e`:
:math:`\partial d/\partial f = e/d` (Euclidean) and, for the normalised distance,
:math:`\partial d/\partial f = (e - \hat f\,(\hat f \cdot e))/(d\,\lVert f \rVert)`,
:math:`\partial d/\partial p = -(e - \hat p\,(\hat p \cdot e))/(d\,\lVert p \rVert)`
(:math:`\hat f \cdot e = d^2/2` for unit vectors). So in float32 the values of flagged pairs are the float64
values rounded (relative error :math:`\le 10^{-6}` at any distance, 0 only for equal vectors) and their
gradient contributions are exact to float32 rounding; an unflagged entry has
:math:`d^2 > \rho\,(\dots)`, where the expansion keeps a relative error near
:math:`u\,(\lVert f \rVert^2 + \lVert p \rVert^2)/d^2 \lesssim 10^{-5}` (:math:`u = 2^{-24}`). Finding the
pairs costs one reduction over the :math:`B \times C` matrix and, on CUDA, one host sync per forward.

**Static-shape path** (tracing, ``torch.export`` — e.g. the MLflow ``pt2`` model —, ``torch.compile``,
TorchScript, torch.func, autocast, float16/bfloat16): data-dependent shapes are not available, so a fixed
number of pairs is recomputed: each row's :math:`k = \min(C, 4)` **nearest prototypes** by the expanded
formula, exactly (value and gradient, from the explicit difference in float64). The other pairs keep the
expansion, whose rounding :math:`\epsilon_2 \approx 4 \sqrt{D}\, u\, (\lVert f \rVert^2 + \lVert p \rVert^2)`
in the work dtype bounds their absolute error by :math:`\min(\epsilon_2 / (2d), \sqrt{\epsilon_2})` (measured:
at most 0.45 of it). In float32, D = 2048, :math:`\sqrt{\epsilon_2} \approx 4.6 \cdot 10^{-3}` for normalised
distances and :math:`\approx 3.3 \cdot 10^{-3}\,\sqrt{\lVert f \rVert^2 + \lVert p \rVert^2}` for Euclidean
ones. The truly nearest prototype, which decides the class and the scores, is among the recomputed ones
unless more than four prototypes lie within :math:`\sqrt{\epsilon_2}` of each other around the feature; with
clustered prototypes beyond that, the bound above is what holds. Under the deprecated ``torch.jit.trace``,
:math:`k = 1` (a shape-dependent ``min`` cannot be recorded).

**Zero rows.** A vector is normalised as ``F.normalize`` does, :math:`v / \max(\lVert v \rVert, \epsilon)`,
with :math:`\epsilon = 10^{-12}` except for float16 tensors, where :math:`\epsilon = 2^{-8}`: the gradient at
a zero row scales with :math:`1/\epsilon`, which must stay far below float16's largest value (65504). A
row with :math:`0 < \lVert v \rVert \le \epsilon` has :math:`\lVert \hat v \rVert = \lVert v \rVert/\epsilon`
on both paths.
"""

from __future__ import annotations

import torch

from ._near_pairs import NORM_EPS as _NORM_EPS
from ._near_pairs import add_exact_gradients as _add_exact_gradients
from ._near_pairs import flags as _flags
from ._near_pairs import root_and_recompute as _root_and_recompute
from ._static_distances import euclidean_reference as _euclidean_reference
from ._static_distances import normalized_reference as _normalized_reference
from ._static_distances import safe_sqrt
from ._static_distances import scaled as _scaled

__all__ = ["euclidean_distances", "normalized_distances", "safe_sqrt"]

_NEAR = 1e-2  # recompute d exactly where d^2 <= _NEAR * (|f|^2 + |p|^2): the expansion cancels there
_FUSED_DTYPES = (torch.float32, torch.float64)


def _row_norms(v: torch.Tensor) -> torch.Tensor:
    # vector_norm reduces without materialising v * v (a C x D temporary for the prototypes).
    return torch.linalg.vector_norm(v, dim=1)


# ----------------------------------------------------------------------------------------------- Euclidean
def _euclidean_kernel(x: torch.Tensor, prototypes: torch.Tensor):
    r"""Distances :math:`B \times C`, the flagged pairs recomputed exactly, and those pairs' indices."""
    x_sq = _row_norms(x).square_()
    p_sq = _row_norms(prototypes).square_()
    d = torch.add(x_sq.unsqueeze(1), p_sq)  # |f|^2 + |p|^2, then - 2 f.p in the product's epilogue
    d.addmm_(x, prototypes.t(), alpha=-2.0)
    (any_near,) = _flags(d, _NEAR * (x_sq.max() + p_sq.max()) if d.numel() else 0.0)
    near = d <= torch.add(x_sq.unsqueeze(1), p_sq).mul_(_NEAR) if any_near else None
    rows, cols = _root_and_recompute(d, x, prototypes, near, normalized=False)
    return d, (rows, cols)


def _save(ctx, out: torch.Tensor, d: torch.Tensor, *tensors) -> None:
    """Save ``tensors`` and the distances; distances that are not the output stay private to the node (the
    backward may reuse their buffer), the output is saved as such (no reference cycle)."""
    ctx.d_is_output = out is d
    ctx.d = None if ctx.d_is_output else d
    ctx.save_for_backward(*tensors, *((d,) if ctx.d_is_output else ()))


def _take_distances(ctx, kernel, x, prototypes) -> tuple[torch.Tensor, bool]:
    """The forward's distances and whether their buffer may be overwritten; recomputed for a second backward
    through a retained graph (the first one consumed them)."""
    if ctx.d_is_output:
        return ctx.saved_tensors[-1], False
    d, ctx.d = ctx.d, None
    return (kernel(x, prototypes)[0] if d is None else d), True


def _reference_backward(ctx, grad, reference, add_mean: bool):
    """Gradients of the plain expression: used for higher-order derivatives (``create_graph=True``), where the
    fused backward (in-place, from forward-time intermediates) would not be differentiable."""
    x, prototypes, scale = ctx.saved_tensors[:3]
    needed = _needed(ctx)
    inputs = [t for t, need in zip((x, prototypes, scale), needed) if need]
    out = _scaled(reference(x, prototypes), scale, add_mean, inplace=False)
    grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


def _needed(ctx) -> tuple[bool, bool, bool]:
    """``needs_input_grad`` of (x, prototypes, scale); ``apply(x, prototypes)`` alone has no scale."""
    return (tuple(ctx.needs_input_grad) + (False, False, False))[:3]


def _scale_gradient(u: torch.Tensor, scale: torch.Tensor | None, needed: bool):
    """``sum(u)`` shaped and typed like ``scale``, where its gradient is needed."""
    return u.sum().reshape(scale.shape).to(scale.dtype) if needed else None


class _EuclideanDistances(torch.autograd.Function):
    r"""``s * ||x_b - p_c||`` in one node, with a backward of two matrix products and two row-scaled copies.

    With :math:`H = s\,g / d` (0 at the flagged pairs, whose exact gradients :math:`\pm s\,g\,e/d` are added
    from :math:`e = x - p`): :math:`\nabla_x = \mathrm{rowsum}(H)\, x - H P`,
    :math:`\nabla_P = \mathrm{colsum}(H)\, P - H^\top x`, :math:`\nabla_s = \sum g \odot d`.
    With :math:`d` exact, the cancellation left in :math:`H_{bc}(x_b - p_c)` is a relative
    :math:`u\,\lVert x \rVert / d` (:math:`u` the unit roundoff), below :math:`10^{-3}` in float32 for
    unflagged pairs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | None = None):
        d, (rows, cols) = _euclidean_kernel(x, prototypes)
        out = _scaled(d, scale, False, inplace=False)
        _save(ctx, out, d, x, prototypes, scale, rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(ctx, grad, _euclidean_reference, False)
        x, prototypes, scale, rows, cols = ctx.saved_tensors[:5]
        need_x, need_p, need_s = _needed(ctx)
        d, own = _take_distances(ctx, _euclidean_kernel, x, prototypes)
        s = 1.0 if scale is None else scale.to(d.dtype)
        grad_s = _scale_gradient(torch.mul(grad, d), scale, True) if need_s else None
        flagged = rows.numel() > 0
        upstream = grad[rows, cols] * s if flagged else None
        h = torch.div(grad, d, out=d) if own else torch.div(grad, d)
        if flagged:
            h[rows, cols] = 0.0
        if scale is not None:
            h.mul_(s)
        grad_x = grad_p = None
        if need_x:
            grad_x = x * h.sum(dim=1, keepdim=True)
            grad_x.addmm_(h, prototypes, alpha=-1.0)
        if need_p:
            grad_p = prototypes * h.sum(dim=0).unsqueeze(1)
            grad_p.addmm_(h.t(), x, alpha=-1.0)
        if flagged:
            _add_exact_gradients(x, prototypes, rows, cols, upstream, grad_x, grad_p, normalized=False)
        return grad_x, grad_p, grad_s


# ----------------------------------------------------------------------------------------------- normalised
def _normalized_kernel(x: torch.Tensor, prototypes: torch.Tensor):
    r"""Normalised distances :math:`B \times C` (flagged pairs exact) and what the backward needs."""
    x_norm, p_norm = _row_norms(x), _row_norms(prototypes)
    a = x_norm.clamp_min(_NORM_EPS).reciprocal_()
    q = p_norm.clamp_min(_NORM_EPS).reciprocal_()
    x_normal, p_normal = x_norm > _NORM_EPS, p_norm > _NORM_EPS
    # |v^|^2 = (|v| / max(|v|, eps))^2: 1 above the floor, F.normalize's (|v|/eps)^2 at or below it
    ux = (x_norm * a).square_().masked_fill_(x_normal, 1.0)
    up = (p_norm * q).square_().masked_fill_(p_normal, 1.0)
    # d^2 = |f^|^2 + |p^|^2 - 2 q (a f.p), built in place in the buffer of the matrix product
    d = torch.mm(x, prototypes.t()).mul_(q)
    torch.addcmul(ux.unsqueeze(1), d, a.mul(-2.0).unsqueeze(1), out=d)
    d.add_(up)
    # rows at or below the floor (|v^| < 1, zero rows included) need the general cosine in the backward
    any_near, floor_x, floor_p = _flags(d, 2.0 * _NEAR, (~x_normal).any(), (~p_normal).any())
    rows, cols = _root_and_recompute(d, x, prototypes, d <= 2.0 * _NEAR if any_near else None, normalized=True)
    return d, (a, q, ux, up, x_normal, p_normal, rows, cols), (floor_x, floor_p)


class _NormalizedDistances(torch.autograd.Function):
    r"""``s * (d + [mean_j d])`` with ``d[b, c] = ||x_b/|x_b| - p_c/|p_c|||`` (``F.normalize`` semantics) in one
    autograd node.

    With :math:`V = g + [\mathrm{rowmean}(g)]`, :math:`T = V / d`, :math:`U = V d` (flagged pairs left out and
    their exact gradients added from :math:`e = \hat x - \hat p`), :math:`a = 1/|x|`, :math:`q = 1/|p|`,
    :math:`K = -s\,a\,T\,q` (outer scaling) and :math:`\cos = (|\hat x|^2 + |\hat p|^2 - d^2)/2`:
    :math:`\nabla_x = K P + \beta x` with :math:`\beta = -a^2 \sum_c G \cos = \tfrac{s a^2}{2}
    (|\hat x|^2 \mathrm{rowsum}(T) + T |\hat p|^2 - \mathrm{rowsum}(U))` (for :math:`C \ge 3D` the same
    :math:`\beta` comes from projecting :math:`KP` on the tangent space, cheaper there), :math:`\nabla_P =
    K^\top x + \gamma P` with :math:`\gamma` the same per column, :math:`\nabla_s = \sum U`. A row at the eps
    floor (constant scale) has :math:`\beta = s a^2 \mathrm{rowsum}(T)`, a prototype there
    :math:`\gamma = s q^2 \mathrm{colsum}(T)`. Only ``d`` is kept at :math:`B \times C` size; a buffer of it
    or of :math:`V` becomes :math:`T` and then :math:`K`.
    """

    @staticmethod
    def forward(ctx, x, prototypes, scale: torch.Tensor | None = None, add_mean: bool = False):
        d, state, (ctx.floor_x, ctx.floor_p) = _normalized_kernel(x, prototypes)
        out = _scaled(d, scale, add_mean, inplace=False)
        ctx.add_mean = add_mean
        _save(ctx, out, d, x, prototypes, scale, *state)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(ctx, grad, _normalized_reference, ctx.add_mean) + (None,)
        x, prototypes, scale, a, q, ux, up, x_normal, p_normal, rows, cols = ctx.saved_tensors[:11]
        need_x, need_p, need_s = _needed(ctx)
        d, own = _take_distances(ctx, _normalized_kernel, x, prototypes)
        s = 1.0 if scale is None else scale.to(d.dtype)
        row_sums = need_x and prototypes.shape[0] < 3 * prototypes.shape[1]  # else the tangent projection
        v = torch.add(grad, grad.mean(dim=1, keepdim=True)) if ctx.add_mean else grad  # V
        upstream = v[rows, cols] * s if rows.numel() else None
        colsum_u, rowsum_u, grad_s = _u_sums(v, d, rows, cols, need_p or need_s, row_sums, scale, need_s)
        if not (need_x or need_p):
            return None, None, grad_s, None
        if ctx.add_mean:  # T = V / d, in V's buffer, else in d's when it is private
            t = v.div_(d)
        else:
            t = torch.div(grad, d, out=d) if own else torch.div(grad, d)
        del d, v
        if upstream is not None:
            t[rows, cols] = 0.0
        grad_p = None
        if need_p:  # the part of the prototypes' gradient along themselves, before T becomes K
            grad_p = prototypes * _coefficients(t, 0, ux, ctx.floor_x, colsum_u, p_normal, q, s).unsqueeze(1)
        beta = None
        if need_x and (row_sums or ctx.floor_x):
            beta = _coefficients(t, 1, up, ctx.floor_p, rowsum_u, x_normal, a, s)
        k = t.mul_((a * -s).unsqueeze(1)).mul_(q)  # K = a G q with G = -s T
        grad_x = _normalized_grad_x(k, x, prototypes, a, beta, row_sums, x_normal) if need_x else None
        if need_p:
            grad_p.addmm_(k.t(), x)
        if upstream is not None:
            _add_exact_gradients(x, prototypes, rows, cols, upstream, grad_x, grad_p, normalized=True)
        return grad_x, grad_p, grad_s, None


def _u_sums(v, d, rows, cols, columns: bool, by_row: bool, scale, need_s: bool):
    """Column and row sums of :math:`U = V d` without the flagged pairs, and the scale's gradient
    :math:`\\sum U` (over every pair); ``None`` for what is not asked for."""
    if not (columns or by_row):
        return None, None, None
    u = torch.mul(v, d)
    colsum = u.sum(dim=0) if columns else None
    rowsum = u.sum(dim=1) if by_row else None
    grad_s = _scale_gradient(colsum if colsum is not None else rowsum, scale, need_s)
    if rows.numel():  # the flagged pairs' exact gradients are added separately
        flagged = -u[rows, cols]
        if colsum is not None:
            colsum.index_put_((cols,), flagged, accumulate=True)
        if rowsum is not None:
            rowsum.index_put_((rows,), flagged, accumulate=True)
    return colsum, rowsum, grad_s


def _coefficients(t, dim: int, unit_other, floor_other: bool, u_sum, normal, inverse, s):
    r"""Per column (``dim=0``) or row (``dim=1``): :math:`-\mathrm{inv}^2 \sum G \cos` for vectors above the
    floor, :math:`-\mathrm{inv}^2 \sum G` at it, from :math:`T` (:math:`G = -sT`), the other side's
    :math:`|\hat v|^2` and the sum of :math:`U` (None when only floor vectors need it)."""
    t_sum = t.sum(dim=dim)
    if u_sum is None:
        return t_sum.mul_(inverse.square()).mul_(s)
    weighted = torch.mv(t.t() if dim == 0 else t, unit_other) if floor_other else t_sum  # sum T |v^|^2
    general = (t_sum + weighted).sub_(u_sum).mul_(0.5)  # |v^|^2 = 1 above the floor
    return torch.where(normal, general, t_sum).mul_(inverse.square()).mul_(s)


def _normalized_grad_x(k, x, prototypes, a, beta, row_sums: bool, x_normal):
    r""":math:`K P + \beta x`; without ``row_sums``, :math:`\beta x` of the rows above the floor is the
    projection of :math:`K P` on their tangent space (``beta`` then holds the floor rows' only, or None)."""
    if row_sums:
        grad_x = x * beta.unsqueeze(1)
        return grad_x.addmm_(k, prototypes)
    grad_x = torch.mm(k, prototypes)
    projection = (x * grad_x).sum(dim=1).mul_(a.square()).neg_()
    if beta is not None:
        projection = torch.where(x_normal, projection, beta)
    return grad_x.addcmul_(x, projection.unsqueeze(1))


# ----------------------------------------------------------------------------------------------- dispatch
def _fused_ok(x: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | None) -> bool:
    # Eager, same float32/float64 dtype, no autocast: the fused kernels apply. Tracing, export, compile,
    # torch.func transforms, autocast and half precision get the plain differentiable expression.
    if x.dtype != prototypes.dtype or x.dtype not in _FUSED_DTYPES or x.device != prototypes.device:
        return False
    if scale is not None and scale.device != x.device:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func (vmap, grad, jacrev, ...)
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _as_scale(scale, features: torch.Tensor) -> torch.Tensor | None:
    """``None``, or ``scale`` as a one-element tensor (a number becomes one in at least float32)."""
    if scale is None or isinstance(scale, torch.Tensor):
        if scale is not None and scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor; got shape {tuple(scale.shape)}.")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or a one-element tensor; got {type(scale).__name__}.")
    dtype = torch.promote_types(features.dtype, torch.float32) if features.is_floating_point() else torch.float32
    return torch.full((), float(scale), dtype=dtype, device=features.device)


def _dispatch(function, kernel, reference, x, prototypes, scale, add_mean: bool) -> torch.Tensor:
    """Fused node (training), fused kernel (no gradient) or the plain expression, see :func:`_fused_ok`."""
    if _fused_ok(x, prototypes, scale):
        if _needs_grad(x, prototypes, scale):
            return function.apply(x, prototypes, scale, *((add_mean,) if function is _NormalizedDistances else ()))
        return _scaled(kernel(x, prototypes)[0], scale, add_mean, inplace=True)
    distances = _scaled(reference(x, prototypes), scale, add_mean, inplace=False)
    if torch.is_autocast_enabled(x.device.type):
        return distances
    return distances.to(torch.promote_types(x.dtype, prototypes.dtype))


def euclidean_distances(
    features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Euclidean distances :math:`s\,\lVert f_b - p_j \rVert`.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :param scale: optional factor :math:`s` (a number or a one-element tensor, differentiable), applied
        inside the fused node (cheaper than multiplying the result).
    :return: :math:`B \times C`, non-negative for :math:`s > 0`, with a finite gradient (0) where a distance
        is 0.
    :raises ValueError: if ``scale`` has more than one element.
    """
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return _scaled(_euclidean_reference(features, prototypes), scale, False, False)
    else:
        scale = _as_scale(scale, features)
        return _dispatch(_EuclideanDistances, _euclidean_kernel, _euclidean_reference, features, prototypes,
                         scale, False)


def normalized_distances(
    features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | None = None, add_mean: bool = False
) -> torch.Tensor:
    r"""Distances between L2-normalised vectors, :math:`u_{bj} = \lVert \hat f_b - \hat p_j \rVert \in [0, 2]`,
    times ``scale``; with ``add_mean`` (DisMax) :math:`s\,(u_{bj} + \frac1C \sum_k u_{bk})`.

    With :math:`\hat v = v / \max(\lVert v \rVert, \epsilon)` (as ``F.normalize``; :math:`\epsilon` see the
    module doc), :math:`\lVert \hat f - \hat p \rVert^2 = \lVert \hat f \rVert^2 + \lVert \hat p \rVert^2
    - 2\, f \cdot p / (\lVert f \rVert \lVert p \rVert)`; neither side is copied in normalised form.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :param scale: optional factor :math:`s` (a number or a one-element tensor, differentiable).
    :param add_mean: add each row's mean distance before scaling (the DisMax logit).
    :return: :math:`B \times C`
    :raises ValueError: if ``scale`` has more than one element.
    """
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return _scaled(_normalized_reference(features, prototypes), scale, add_mean, False)
    else:
        scale = _as_scale(scale, features)
        return _dispatch(_NormalizedDistances, _normalized_kernel, _normalized_reference, features, prototypes,
                         scale, add_mean)
