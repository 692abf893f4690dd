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
whose hand-written backward needs one matrix product per input (each writing its gradient, as Linear's do), one
in-place row-scaled pass over each gradient (the part along its own operand: ``addcmul_``) and a few
:math:`B \times C` passes (on the CPU, in cache-sized blocks of rows when the matrix is larger than
:math:`2^{18}` elements); the forward reads the prototypes once more for their norms. Under autocast,
for float16/bfloat16 tensors, under torch.func transforms and while tracing, scripting, exporting or
compiling, the same formula is evaluated with plain differentiable operations (the matrix product in the
autocast dtype, the rest in at least float32).

**Exactness near a prototype (fused path).** The expansion cancels when :math:`d` is small next to
:math:`\lVert f \rVert + \lVert p \rVert` (the regime IsoMax training drives features into). Every entry
with :math:`d^2 \le \rho\,(\lVert f \rVert^2 + \lVert p \rVert^2)` (Euclidean) or :math:`d^2 \le 2\rho`
(normalised, where :math:`\lVert \hat f \rVert^2 + \lVert \hat p \rVert^2 \le 2`), :math:`\rho = 10^{-2}`,
is recomputed as the norm of the explicit difference :math:`e = f - p` or :math:`e = \hat f - \hat p`,
evaluated in float64 (float32 on MPS) for the :math:`K` flagged pairs, in chunks; :math:`e` is kept (K x D,
in the input dtype) for the backward. The backward drops those pairs from the matrix-product terms and adds
their exact gradients, :math:`\partial d/\partial f = e/d` (Euclidean) and, normalised,
:math:`\partial d/\partial f = (e - \hat f\,(\hat f \cdot e))/(d\,\lVert f \rVert)`,
:math:`\partial d/\partial p = -(e - \hat p\,(\hat p \cdot e))/(d\,\lVert p \rVert)`: the :math:`e` parts from
the kept differences, the parts along :math:`f` and :math:`p` folded into the per-row and per-column
coefficients the backward applies anyway, with :math:`\hat f \cdot e = (d^2 + |\hat f|^2 - |\hat p|^2)/2` and
:math:`\hat p \cdot e = (|\hat f|^2 - |\hat p|^2 - d^2)/2` (:math:`\pm d^2/2` for unit vectors; no such part at
the eps floor, where the scale is constant). So in float32 a flagged pair's value is its float64 value
rounded (0 only for equal vectors) and its gradient exact to float32 rounding, at any distance (measured
against float64 from 1e-2 down to 1e-6: values within 6e-8 relative, gradients within 3e-7 relative); an
unflagged entry has :math:`d^2 > \rho\,(\dots)`, where the expansion keeps a relative error near
:math:`u\,(\lVert f \rVert^2 + \lVert p \rVert^2)/d^2 \lesssim 10^{-5}` (:math:`u = 2^{-24}`; normalised,
D = 2048: at most 1.5e-6 absolute). Finding the pairs costs one reduction over the :math:`B \times C` matrix
and, on CUDA, one host sync per forward; the recompute costs about ten float64 passes over :math:`K \times D`.

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
from ._near_pairs import add_pair_gradients as _add_pair_gradients
from ._near_pairs import flags as _flags
from ._near_pairs import pair_terms as _pair_terms
from ._near_pairs import per_distance as _per_distance
from ._near_pairs import root_and_recompute as _root_and_recompute
from ._normalized_backward import coefficients as _coefficients
from ._normalized_backward import grad_x as _normalized_grad_x
from ._normalized_backward import stage as _normalized_stage
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
def _euclidean_kernel(x: torch.Tensor, prototypes: torch.Tensor, keep: bool = False):
    r"""Distances :math:`B \times C`, the flagged pairs recomputed exactly, and those pairs' indices."""
    x_sq = _row_norms(x).square_()
    p_sq = _row_norms(prototypes).square_()
    d = torch.add(x_sq.unsqueeze(1), p_sq)  # |f|^2 + |p|^2, then - 2 f.p in the product's epilogue
    d.addmm_(x, prototypes.t(), alpha=-2.0)
    (any_near,) = _flags(d, _NEAR * (x_sq.max() + p_sq.max()) if d.numel() else 0.0)
    near = d <= torch.add(x_sq.unsqueeze(1), p_sq).mul_(_NEAR) if any_near else None
    return d, _root_and_recompute(d, x, prototypes, near, normalized=False, keep=keep)


def _save(ctx, out: torch.Tensor, d: torch.Tensor, x, prototypes, scale, *tensors) -> None:
    """Save the inputs, ``tensors`` and the distances; distances that are not the output stay private to the
    node (the backward may reuse their buffer), the output is saved as such (no reference cycle); a number
    ``scale`` is kept on ``ctx``."""
    ctx.d_is_output = out is d
    ctx.d = None if ctx.d_is_output else d
    ctx.number = scale if isinstance(scale, float) else None
    scale = None if ctx.number is not None else scale
    ctx.save_for_backward(x, prototypes, scale, *tensors, *((d,) if ctx.d_is_output else ()))


def _scale_of(ctx, scale, dtype: torch.dtype):
    """The factor of the node as a number or a tensor of ``dtype`` (1.0 without one)."""
    if ctx.number is not None:
        return ctx.number
    return 1.0 if scale is None else scale.to(dtype)


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
    out = _scaled(reference(x, prototypes), ctx.number if scale is None else scale, add_mean, inplace=False)
    grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


def _needed(ctx) -> tuple[bool, bool, bool]:
    """``needs_input_grad`` of (x, prototypes, scale); ``apply(x, prototypes)`` alone has no scale."""
    return (tuple(ctx.needs_input_grad) + (False, False, False))[:3]


def _product(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (a @ b)`` in a fresh tensor written by the matrix product itself (``beta = 0``: nothing is read
    first). A gradient's part along its own operand is added afterwards with one in-place ``addcmul_``, which
    is cheaper than writing it first and accumulating the product into it (a product with ``beta = 1`` reads
    its output; timed once: 114 ms vs 127 ms for the C x D gradient at (64, 2048, 21841))."""
    if alpha == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)


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
    def forward(ctx, x: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float | None = None):
        d, pairs = _euclidean_kernel(x, prototypes, keep=True)
        out = _scaled(d, scale, False, inplace=False)
        _save(ctx, out, d, x, prototypes, scale, *pairs)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(ctx, grad, _euclidean_reference, False)
        x, prototypes, scale, rows, cols, kept = ctx.saved_tensors[:6]
        need_x, need_p, need_s = _needed(ctx)
        d, own = _take_distances(ctx, _euclidean_kernel, x, prototypes)
        s = _scale_of(ctx, scale, d.dtype)
        grad_s = _scale_gradient(torch.mul(grad, d), scale, True) if need_s else None
        flagged = rows.numel() > 0
        weight = _per_distance(grad[rows, cols] * s, d[rows, cols]) if flagged else None  # s g / d
        h = torch.div(grad, d, out=d) if own else torch.div(grad, d)
        if flagged:
            h[rows, cols] = 0.0
        alpha = s if isinstance(s, float) else 1.0  # a number goes into the products, a tensor into H
        if not isinstance(s, float):
            h.mul_(s)
        grad_x = grad_p = None
        if need_x:
            grad_x = _product(h, prototypes, -alpha).addcmul_(x, h.sum(dim=1, keepdim=True), value=alpha)
        if need_p:
            grad_p = _product(h.t(), x, -alpha).addcmul_(prototypes, h.sum(dim=0).unsqueeze(1), value=alpha)
        if flagged:  # the flagged pairs: +- s g e / d from their exact differences e = x - p
            _add_pair_gradients((grad_x, grad_p), (rows, cols), (weight, -weight), kept, x, prototypes, rows, cols,
                                normalized=False)
        return grad_x, grad_p, grad_s


# ----------------------------------------------------------------------------------------------- normalised
def _normalized_kernel(x: torch.Tensor, prototypes: torch.Tensor, keep: bool = False):
    r"""Normalised distances :math:`B \times C` (flagged pairs exact) and what the backward needs.

    The common case has every row and prototype above the eps floor (:math:`|\hat v|^2 = 1`), so :math:`d^2 = 2 -
    2\,q\,(a\,f \cdot p)` is built in the product's buffer and the floor is only looked for, in the same host
    read as the near pairs; where some vector is at it, the offsets :math:`|\hat v|^2 - 1` are added then."""
    x_norm, p_norm = _row_norms(x), _row_norms(prototypes)
    a = x_norm.clamp_min(_NORM_EPS).reciprocal_()
    q = p_norm.clamp_min(_NORM_EPS).reciprocal_()
    d = torch.mm(x, prototypes.t()).mul_(q).mul_(a.mul(-2.0).unsqueeze(1)).add_(2.0)
    # NaN-safe: a NaN norm is not at the floor (its row is NaN either way), a zero one beside it still is
    any_near, at_floor = _flags(d, 2.0 * _NEAR, (torch.cat((x_norm, p_norm)) <= _NORM_EPS).any())
    floors, floor_flags = (None, None, None, None), (False, False)
    if at_floor:  # rare: |v^|^2 = (|v| / eps)^2 < 1 for |v| <= eps (zero rows included); they need the general cosine
        x_normal, p_normal = x_norm > _NORM_EPS, p_norm > _NORM_EPS
        ux = (x_norm * a).square_().masked_fill_(x_normal, 1.0)
        up = (p_norm * q).square_().masked_fill_(p_normal, 1.0)
        d.add_(ux.sub(1.0).unsqueeze(1)).add_(up.sub(1.0))
        any_near, *floor_flags = _flags(d, 2.0 * _NEAR, (~x_normal).any(), (~p_normal).any())
        floors = (ux, up, x_normal, p_normal)
    pairs = _root_and_recompute(d, x, prototypes, d <= 2.0 * _NEAR if any_near else None, True, keep)
    return d, (a, q, *floors, *pairs), tuple(floor_flags)


def _unit_squares(ux, up, x_normal, p_normal, a, q):
    r"""The floor data of :func:`_normalized_kernel`, made where it was not needed (no vector at the floor):
    :math:`|\hat v|^2 = 1`, every vector above the floor."""
    if ux is not None:
        return ux, up, x_normal, p_normal
    return (torch.ones_like(a), torch.ones_like(q), torch.ones_like(a, dtype=torch.bool),
            torch.ones_like(q, dtype=torch.bool))


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
    def forward(ctx, x, prototypes, scale: torch.Tensor | float | None = None, add_mean: bool = False):
        d, state, (ctx.floor_x, ctx.floor_p) = _normalized_kernel(x, prototypes, keep=True)
        out = _scaled(d, scale, add_mean, inplace=False)
        ctx.add_mean = add_mean
        _save(ctx, out, d, x, prototypes, scale, *state)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(ctx, grad, _normalized_reference, ctx.add_mean) + (None,)
        x, prototypes, scale, a, q, ux, up, x_normal, p_normal, rows, cols, kept = ctx.saved_tensors[:12]
        need_x, need_p, need_s = _needed(ctx)
        d, own = _take_distances(ctx, _normalized_kernel, x, prototypes)
        s = _scale_of(ctx, scale, d.dtype)
        row_sums = need_x and prototypes.shape[0] < 3 * prototypes.shape[1]  # else the tangent projection
        floors = (ux if ctx.floor_x and need_p else None, up if ctx.floor_p and row_sums else None)
        k, sums, pair_v, pair_d = _normalized_stage(grad, d, own, ctx.add_mean, rows, cols, a * -s, q, *floors)
        del d
        if need_s:
            total = sums["rowsum_u"].sum()
            grad_s = _scale_gradient(total + pair_v.mul(pair_d).sum() if rows.numel() else total, scale, True)
        else:
            grad_s = None
        if not (need_x or need_p):
            return None, None, grad_s, None
        pairs = None
        if rows.numel():
            ux, up, x_normal, p_normal = _unit_squares(ux, up, x_normal, p_normal, a, q)
            pairs = _pair_terms(pair_v * s, pair_d, a[rows], q[cols], ux[rows], up[cols], x_normal[rows],
                                p_normal[cols])
        gamma = beta = grad_p = None
        if need_p:  # the part of the prototypes' gradient along themselves
            gamma = _coefficients(sums["colsum_t"], sums["t_ux"], sums["colsum_u"], p_normal, q, s, not ctx.floor_p)
            gamma = gamma if pairs is None else gamma.index_add_(0, cols, pairs[3])
        if need_x and (row_sums or ctx.floor_x):
            beta = _coefficients(sums["rowsum_t"], sums["t_up"], sums["rowsum_u"] if row_sums else None, x_normal, a, s,
                                 not ctx.floor_x)
        extra = None if pairs is None or not need_x else torch.zeros_like(a).index_add_(0, rows, pairs[2])
        grad_x = _normalized_grad_x(k, x, prototypes, a, beta, row_sums, x_normal, extra) if need_x else None
        if need_p:
            grad_p = torch.mm(k.t(), x).addcmul_(prototypes, gamma.unsqueeze(1))
        if pairs is not None:  # the flagged pairs' e-parts, from their exact differences e = x^ - p^
            _add_pair_gradients((grad_x, grad_p), (rows, cols), pairs[:2], kept, x, prototypes, rows, cols,
                                normalized=True)
        return grad_x, grad_p, grad_s, None


# ----------------------------------------------------------------------------------------------- dispatch
def _fused_ok(x: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | None) -> bool:
    # Eager, same float32/float64 dtype, no autocast: the fused kernels apply. Tracing, export, compile,
    # torch.func transforms, autocast and half precision get the plain differentiable expression.
    if x.dtype != prototypes.dtype or x.dtype not in _FUSED_DTYPES or x.device != prototypes.device:
        return False
    if isinstance(scale, torch.Tensor) and scale.device != x.device:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func (vmap, grad, jacrev, ...)
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _as_scale(scale) -> torch.Tensor | float | None:
    """``None``, a one-element tensor or a number (as a float); the shape is checked in eager mode only."""
    if scale is None or isinstance(scale, torch.Tensor):
        if scale is not None and not torch.jit.is_tracing() and scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor; got shape {tuple(scale.shape)}.")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or a one-element tensor; got {type(scale).__name__}.")
    return float(scale)


def _dispatch(function, kernel, reference, x, prototypes, scale, add_mean: bool) -> torch.Tensor:
    """Fused node (training), fused kernel (no gradient) or the plain expression, see :func:`_fused_ok`. The
    result has the inputs' promoted dtype, promoted again with a tensor ``scale``'s (so a float32 factor gives
    float32 logits for float16 inputs); under autocast, the plain expression's (at least float32)."""
    if _fused_ok(x, prototypes, scale):
        if _needs_grad(x, prototypes, scale):
            extra = (add_mean,) if function is _NormalizedDistances else ()
            distances = function.apply(x, prototypes, scale, *extra)
        else:
            distances = _scaled(kernel(x, prototypes)[0], scale, add_mean, inplace=True)
    else:
        distances = _scaled(reference(x, prototypes), scale, add_mean, inplace=False)
        if torch.is_autocast_enabled(x.device.type):
            return distances
    dtype = torch.promote_types(x.dtype, prototypes.dtype)
    if isinstance(scale, torch.Tensor):
        dtype = torch.promote_types(dtype, scale.dtype)
    return distances.to(dtype)


def euclidean_distances(
    features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float | None = None
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
        scale = _as_scale(scale)
        return _dispatch(_EuclideanDistances, _euclidean_kernel, _euclidean_reference, features, prototypes,
                         scale, False)


def normalized_distances(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    add_mean: bool = False,
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
        scale = _as_scale(scale)
        return _dispatch(_NormalizedDistances, _normalized_kernel, _normalized_reference, features, prototypes,
                         scale, add_mean)
