r"""Distances from feature vectors to class prototypes, computed with matrix products.

Everything here is a pure function of tensors. The squared distance is expanded as

.. math::

    \lVert f - p_j \rVert^2 = \lVert f \rVert^2 + \lVert p_j \rVert^2 - 2\, f \cdot p_j ,

so the only :math:`B \times C \times D` work is one matrix product, as in ``nn.Linear``; no
:math:`B \times C \times D` difference tensor is built and no normalised copy of the prototypes is made.

In eager float32/float64 training the whole distance (norms, matrix product, normalisation, square
root) is one autograd node (:class:`_EuclideanDistances`, :class:`_NormalizedDistances`) whose
hand-written backward needs one matrix product per input plus one row-scaled pass over the
:math:`C \times D` prototypes, i.e. about the work of ``nn.Linear``. Under autocast, for float16/bfloat16
tensors, under torch.func transforms and while tracing, scripting, exporting or compiling, the same formula is
evaluated with plain differentiable operations (the matrix product in the autocast dtype, the rest in at least
float32).

**Exactness near a prototype.** The expansion cancels when :math:`\lVert f - p \rVert` is small next to
:math:`\lVert f \rVert + \lVert p \rVert` (the regime IsoMax training drives features into). Every entry
with :math:`d^2 \le \rho\,(\lVert f \rVert^2 + \lVert p \rVert^2)`, :math:`\rho = 10^{-2}`, is
recomputed exactly as the norm of the explicit difference (a :math:`K \times D` gather of the :math:`K`
flagged pairs, in chunks; finding them costs a host sync on CUDA), and the backward uses that exact
distance. In eager float32/float64 this gives a relative error below :math:`10^{-3}` whenever
:math:`d \ge 10^{-4}(\lVert f \rVert + \lVert p \rVert)` and never returns 0 for distinct vectors.
The plain path (autocast, half precision, torch.func, tracing), which must keep static shapes, recomputes
each row's nearest prototype exactly instead.

**Zero rows.** A vector is normalised as ``F.normalize`` does, :math:`v / \max(\lVert v \rVert, \epsilon)`,
with :math:`\epsilon = 10^{-12}` except for float16 tensors, where :math:`\epsilon = 2^{-8}`: the gradient at
a zero row scales with :math:`1/\epsilon`, which must stay far below float16's largest value (65504).
"""

from __future__ import annotations

import torch

__all__ = ["euclidean_distances", "normalized_distances", "safe_sqrt"]

_NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize
_HALF_NORM_EPS = 2.0**-8  # float16: 1/eps (the gradient scale at a zero row) leaves ~256x headroom below 65504
_NEAR = 1e-2  # recompute d exactly where d^2 <= _NEAR * (|f|^2 + |p|^2): the expansion cancels there
_FUSED_DTYPES = (torch.float32, torch.float64)


def _norm_eps(dtype: torch.dtype) -> float:
    # literals (= _HALF_NORM_EPS, _NORM_EPS) keep this scriptable
    return 0.00390625 if dtype == torch.float16 else 1e-12


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root of ``max(x, 0)`` whose gradient is 0 (not inf/NaN) where ``x <= 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _row_norms(v: torch.Tensor) -> torch.Tensor:
    # vector_norm reduces without materialising v * v (a C x D temporary for the prototypes).
    return torch.linalg.vector_norm(v, dim=1)


def _reference_backward(reference, ctx, grad):
    """Gradients of the plain expression ``reference(x, P)``: used for higher-order derivatives, where the
    fused backward (in-place, from forward-time intermediates) would not be differentiable."""
    x, prototypes = ctx.saved_tensors[:2]
    inputs = [t for t, needed in zip((x, prototypes), ctx.needs_input_grad[:2]) if needed]
    grads = iter(torch.autograd.grad(reference(x, prototypes), inputs, grad, create_graph=True))
    return tuple(next(grads) if needed else None for needed in ctx.needs_input_grad[:2])


def _divide_where_positive(grad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``grad / d`` where ``d > 0``, else 0 (the subgradient 0 of the norm at 0), with one B x C buffer."""
    return torch.div(grad, d).masked_fill_(d <= 0, 0.0)


# ----------------------------------------------------------------------------------------------- Euclidean
def _near_pairs(d_sq: torch.Tensor, x_sq: torch.Tensor, p_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices :math:`K` of the entries where the expansion cancels (see the module doc)."""
    near = torch.add(x_sq.unsqueeze(1), p_sq.unsqueeze(0)).mul_(_NEAR) >= d_sq
    if not bool(near.any()):  # the usual case: no index tensor is built at all
        empty = torch.empty(0, dtype=torch.long, device=d_sq.device)
        return empty, empty
    count = int(torch.count_nonzero(near))
    # nonzero() on CPU reserves room for every element (B*C int64 pairs): ask for the `count` found only
    nonzero_static = getattr(torch, "nonzero_static", None)
    flat = near.view(-1)
    flat = nonzero_static(flat, size=count) if nonzero_static is not None else flat.nonzero()
    columns = d_sq.shape[1]
    flat = flat.squeeze(1)
    return torch.div(flat, columns, rounding_mode="floor"), flat.remainder(columns)


def _exact_pairs(x: torch.Tensor, prototypes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    r""":math:`\lVert x_r - p_c \rVert` for the :math:`K` pairs, from the explicit differences, in chunks of at
    most ``max(B, C)`` pairs (no :math:`B \times C \times D` tensor)."""
    exact = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    chunk = max(x.shape[0], prototypes.shape[0], 1)
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        difference = x.index_select(0, rows[part]).sub_(prototypes.index_select(0, cols[part]))
        exact[part] = torch.linalg.vector_norm(difference, dim=1)
    return exact


def _euclidean_kernel(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    r"""Distances :math:`B \times C`, the flagged pairs recomputed exactly."""
    x_sq = _row_norms(x).square_()
    p_sq = _row_norms(prototypes).square_()
    d = torch.addmm(p_sq.unsqueeze(0), x, prototypes.t(), alpha=-2.0)  # |p|^2 - 2 f.p
    d.add_(x_sq.unsqueeze(1))
    rows, cols = _near_pairs(d, x_sq, p_sq)
    d.clamp_min_(0.0).sqrt_()
    if rows.numel():
        d[rows, cols] = _exact_pairs(x, prototypes, rows, cols)
    return d


class _EuclideanDistances(torch.autograd.Function):
    r"""``d[b, c] = ||x_b - p_c||`` with a backward of two matrix products and two row-scaled copies.

    With :math:`H = g / d` (0 where :math:`d = 0`):
    :math:`\nabla_x = \mathrm{rowsum}(H)\, x - H P`, :math:`\nabla_P = \mathrm{colsum}(H)\, P - H^\top x`.
    With :math:`d` exact, the cancellation left in :math:`H_{bc}(x_b - p_c)` is a relative
    :math:`u\,\lVert x \rVert / d` (:math:`u` the unit roundoff): below :math:`10^{-3}` in float32 over the
    range where the distances are guaranteed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        d = _euclidean_kernel(x, prototypes)
        ctx.save_for_backward(x, prototypes, d)
        return d

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(_euclidean_reference, ctx, grad)
        x, prototypes, d = ctx.saved_tensors
        h = _divide_where_positive(grad, d)
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_x = x * h.sum(dim=1, keepdim=True)
            grad_x.addmm_(h, prototypes, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            grad_p = prototypes * h.sum(dim=0).unsqueeze(1)
            grad_p.addmm_(h.t(), x, alpha=-1.0)
        return grad_x, grad_p


def _euclidean_reference(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The plain differentiable expression; each row's nearest prototype recomputed exactly (static shapes)."""
    products = x @ prototypes.t()
    work = torch.promote_types(products.dtype, torch.float32)
    xw, pw = x.to(work), prototypes.to(work)
    x_sq = xw.pow(2).sum(dim=1, keepdim=True)
    p_sq = pw.pow(2).sum(dim=1)
    d_sq = x_sq + p_sq.unsqueeze(0) - 2.0 * products.to(work)
    nearest = d_sq.detach().argmin(dim=1, keepdim=True)  # B x 1
    exact = torch.linalg.vector_norm(xw - pw[nearest.squeeze(1)], dim=1, keepdim=True)
    return safe_sqrt(d_sq).scatter(1, nearest, exact)


# ----------------------------------------------------------------------------------------------- normalised
def _normalized_kernel(x: torch.Tensor, prototypes: torch.Tensor):
    x_norm = _row_norms(x)
    p_norm = _row_norms(prototypes)
    x_inv = x_norm.clamp_min(_NORM_EPS).reciprocal_()
    p_inv = p_norm.clamp_min(_NORM_EPS).reciprocal_()
    # |f^|^2 is 1, or 0 for a vector at/below the eps floor (F.normalize maps it to ~0).
    x_unit = (x_norm > _NORM_EPS).to(x.dtype)
    p_unit = (p_norm > _NORM_EPS).to(x.dtype)
    # d^2 = |f^|^2 + |p^|^2 - 2 f^.p^, built in place in the buffer of the matrix product.
    d = (x @ prototypes.t()).mul_((-2.0 * x_inv).unsqueeze(1)).mul_(p_inv.unsqueeze(0))
    d.add_(x_unit.unsqueeze(1)).add_(p_unit.unsqueeze(0)).clamp_min_(0.0).sqrt_()
    return d, x_inv, p_inv, x_unit, p_unit


class _NormalizedDistances(torch.autograd.Function):
    r"""``d[b, c] = ||x_b/|x_b| - p_c/|p_c|||`` (``F.normalize`` semantics) in one autograd node.

    With :math:`G = -g / d` (0 where :math:`d = 0`), :math:`a = 1/|x|`, :math:`q = 1/|p|` and
    :math:`K = a\,G\,q` (outer scaling):
    :math:`\nabla_x = K P - a^2\,\mathrm{rowsum}(G \odot \cos)\, x`,
    :math:`\nabla_P = K^\top x - q^2\,\mathrm{colsum}(G \odot \cos)\, P`
    (the second terms vanish for vectors at the eps floor, whose scale is constant). Only ``d`` is saved
    at :math:`B \times C` size; the backward recovers :math:`\cos = (|\hat f|^2 + |\hat p|^2 - d^2) / 2`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        d, x_inv, p_inv, x_unit, p_unit = _normalized_kernel(x, prototypes)
        ctx.save_for_backward(x, prototypes, d, x_inv, p_inv, x_unit, p_unit)
        return d

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain expression instead
            return _reference_backward(_normalized_reference, ctx, grad)
        x, prototypes, d, x_inv, p_inv, x_unit, p_unit = ctx.saved_tensors
        g = _divide_where_positive(grad, d).neg_()
        gc = d.square().neg_().add_(x_unit.unsqueeze(1)).add_(p_unit.unsqueeze(0)).mul_(0.5).mul_(g)  # g * cos
        row = gc.sum(dim=1).mul_(x_inv.square()).mul_(x_unit).neg_()
        col = gc.sum(dim=0).mul_(p_inv.square()).mul_(p_unit).neg_()
        del gc
        k = g.mul_(x_inv.unsqueeze(1)).mul_(p_inv.unsqueeze(0))
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_x = x * row.unsqueeze(1)
            grad_x.addmm_(k, prototypes)
        if ctx.needs_input_grad[1]:
            grad_p = prototypes * col.unsqueeze(1)
            grad_p.addmm_(k.t(), x)
        return grad_x, grad_p


def _normalized_reference(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    work = torch.promote_types(torch.promote_types(x.dtype, prototypes.dtype), torch.float32)
    xw, pw = x.to(work), prototypes.to(work)
    x_eps, p_eps = _norm_eps(x.dtype), _norm_eps(prototypes.dtype)
    x_norm = safe_sqrt(xw.pow(2).sum(dim=1, keepdim=True))
    p_norm = safe_sqrt(pw.pow(2).sum(dim=1))
    # Normalise in the work dtype (the floor is not representable in float16), multiply in x's dtype.
    unit_x = (xw / x_norm.clamp_min(x_eps)).to(x.dtype)
    products = (unit_x @ prototypes.t()).to(work)
    cosine = products / p_norm.clamp_min(p_eps).unsqueeze(0)
    # |f^|^2: 1 above the floor, (|f| / eps)^2 below it (F.normalize's value, not only 0 or 1)
    x_unit = (x_norm / x_norm.clamp_min(x_eps)).square()
    p_unit = (p_norm / p_norm.clamp_min(p_eps)).square().unsqueeze(0)
    return safe_sqrt(x_unit + p_unit - 2.0 * cosine)


# ----------------------------------------------------------------------------------------------- dispatch
def _fused_ok(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    # Eager, same float32/float64 dtype, no autocast: the fused kernels apply. Tracing, export, compile,
    # torch.func transforms, autocast and half precision get the plain differentiable expression.
    if x.dtype != prototypes.dtype or x.dtype not in _FUSED_DTYPES or x.device != prototypes.device:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func (vmap, grad, jacrev, ...)
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _needs_grad(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or prototypes.requires_grad)


def _plain(reference, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The differentiable expression; outside autocast, in the inputs' promoted dtype."""
    distances = reference(x, prototypes)
    if torch.is_autocast_enabled(x.device.type):
        return distances
    return distances.to(torch.promote_types(x.dtype, prototypes.dtype))


def _dispatch(function, kernel, reference, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Fused node (training), fused kernel (no gradient) or the plain expression, see :func:`_fused_ok`."""
    if _fused_ok(x, prototypes):
        if _needs_grad(x, prototypes):
            return function.apply(x, prototypes)
        distances = kernel(x, prototypes)
        return distances[0] if isinstance(distances, tuple) else distances
    return _plain(reference, x, prototypes)


def euclidean_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    r"""Euclidean distances :math:`\lVert f_b - p_j \rVert`.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :return: :math:`B \times C`, non-negative, with a finite gradient (0) where a distance is 0.
    """
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return _euclidean_reference(features, prototypes)
    else:
        return _dispatch(_EuclideanDistances, _euclidean_kernel, _euclidean_reference, features, prototypes)


def normalized_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    r"""Distances between L2-normalised vectors, :math:`\lVert \hat f_b - \hat p_j \rVert \in [0, 2]`.

    With :math:`\hat v = v / \max(\lVert v \rVert, \epsilon)` (as ``F.normalize``; :math:`\epsilon` see the
    module doc), :math:`\lVert \hat f - \hat p \rVert^2 = \lVert \hat f \rVert^2 + \lVert \hat p \rVert^2
    - 2\, f \cdot p / (\lVert f \rVert \lVert p \rVert)`; neither side is copied in normalised form.

    :param features: :math:`B \times D`
    :param prototypes: :math:`C \times D`
    :return: :math:`B \times C`
    """
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return _normalized_reference(features, prototypes)
    else:
        return _dispatch(_NormalizedDistances, _normalized_kernel, _normalized_reference, features, prototypes)
