r"""The :math:`B \times C` stage and the coefficients of the normalised distances' fused backward.

:class:`dismax_plugin.distances._NormalizedDistances` calls these: :func:`stage` turns the upstream gradient
and the distances into :math:`K` and the row and column sums the coefficients need, :func:`coefficients`
gives the per-row :math:`\beta` and per-column :math:`\gamma` (the gradients' parts along :math:`x` and
:math:`P`), :func:`grad_x` assembles :math:`\nabla_x`. The notation is the node's (see its docstring).
"""

from __future__ import annotations

import torch

__all__ = ["coefficients", "grad_x", "stage"]

_BLOCK_ELEMENTS = 1 << 18  # CPU: the stage in row blocks of ~1 MiB (float32) when the matrix is larger


def stage(grad, d, own: bool, add_mean: bool, rows, cols, row_scale, q, ux, up):
    r"""The :math:`B \times C` part of the backward: :math:`V = g\,[+ \mathrm{rowmean}(g)]`, :math:`U = V d`,
    :math:`T = V / d` (0 at the flagged pairs), the row and column sums of :math:`U` and :math:`T` (and
    :math:`T^\top |\hat x|^2`, :math:`T |\hat p|^2` where ``ux`` / ``up`` are given: rows or prototypes at the
    eps floor), then :math:`K = \mathrm{row\_scale}\, T\, q` in ``d``'s buffer (``own``) or a new one. On the
    CPU a matrix larger than :data:`_BLOCK_ELEMENTS` is done in blocks of rows that stay in cache; a smaller
    one, or any on an accelerator, in one block. Returns K, the sums (``colsum_u``, ``rowsum_u``,
    ``colsum_t``, ``rowsum_t``, ``t_ux``, ``t_up``; the last two are the plain sums of T where ``ux`` /
    ``up`` are None), and V and d at the flagged pairs."""
    batch, classes = d.shape
    k = d if own else torch.empty_like(d)
    step = max(1, _BLOCK_ELEMENTS // max(classes, 1)) if d.device.type == "cpu" else max(batch, 1)
    flagged = rows.numel() > 0
    if step >= batch:  # one block: the sums come straight out
        sums, pair_v, pair_d = _block(grad, d, k, add_mean, (rows, cols) if flagged else None, row_scale, q, ux, up)
        return k, sums, pair_v, pair_d
    parts, pairs = [], []
    bounds = torch.searchsorted(rows, torch.arange(0, batch + step, step, device=rows.device)).tolist() \
        if flagged else None  # rows are sorted: the flagged pairs of each block are one slice
    for i, start in enumerate(range(0, batch, step)):
        block = slice(start, start + step)
        local = None
        if bounds is not None and bounds[i + 1] > bounds[i]:
            local = (rows[bounds[i]:bounds[i + 1]] - start, cols[bounds[i]:bounds[i + 1]])
        part, pair_v, pair_d = _block(grad[block], d[block], k[block], add_mean, local, row_scale[block], q,
                                      None if ux is None else ux[block], up)
        parts.append(part)
        if local is not None:
            pairs.append((pair_v, pair_d))
    sums = {name: torch.cat([part[name] for part in parts]) for name in ("rowsum_u", "rowsum_t")}
    sums.update({name: torch.stack([part[name] for part in parts]).sum(0) for name in ("colsum_u", "colsum_t")})
    sums["t_ux"] = sums["colsum_t"] if ux is None else torch.stack([part["t_ux"] for part in parts]).sum(0)
    sums["t_up"] = sums["rowsum_t"] if up is None else torch.cat([part["t_up"] for part in parts])
    empty = d.new_empty(0)
    pair_v = torch.cat([v for v, _ in pairs]) if pairs else empty
    pair_d = torch.cat([w for _, w in pairs]) if pairs else empty
    return k, sums, pair_v, pair_d


def _block(g, d, k, add_mean: bool, local, row_scale, q, ux, up):
    """One block of rows of :func:`stage` (``local``: the flagged pairs' indices within it, or
    None); K is written into ``k``. Returns the block's sums and V and d at its flagged pairs (empty tensors
    when it has none)."""
    v = torch.add(g, g.mean(dim=1, keepdim=True)) if add_mean else g
    pair_v = pair_d = d.new_empty(0)
    if local is not None:
        pair_v, pair_d = v[local], d[local]
    # U = V d: in V's own buffer when V is ours (then V = U / d again), else in a new one
    u = v.mul_(d) if add_mean else torch.mul(v, d)
    if local is not None:  # the flagged pairs' gradients are added from their exact differences
        u[local] = 0.0
    sums = {"colsum_u": u.sum(dim=0), "rowsum_u": u.sum(dim=1)}
    if add_mean:
        v = u.div_(d)  # V (0 at the flagged pairs), within a rounding of the V above
    del u
    torch.div(v, d, out=k)  # T
    if local is not None:
        k[local] = 0.0
    sums["colsum_t"], sums["rowsum_t"] = k.sum(dim=0), k.sum(dim=1)
    sums["t_ux"] = sums["colsum_t"] if ux is None else torch.mv(k.t(), ux)
    sums["t_up"] = sums["rowsum_t"] if up is None else torch.mv(k, up)
    k.mul_(row_scale.unsqueeze(1)).mul_(q)  # K = a G q with G = -s T
    return sums, pair_v, pair_d


def coefficients(t_sum, weighted, u_sum, normal, inverse, s, all_normal: bool = False):
    r"""Per column or row, from the sums of :math:`T` (:math:`G = -sT`), of :math:`T |\hat v|^2` over the other
    side and of :math:`U`: :math:`-\mathrm{inv}^2 \sum G \cos` for vectors above the floor,
    :math:`-\mathrm{inv}^2 \sum G` at it (only those when ``u_sum`` is None). ``all_normal``: no vector of
    this side is at the floor (``normal`` is all True)."""
    if u_sum is None:
        return (t_sum * inverse.square()).mul_(s)
    if weighted is t_sum:  # no vector of the other side at the floor: (2 t - u) / 2
        general = torch.add(t_sum, u_sum, alpha=-0.5)
    else:
        general = (t_sum + weighted).sub_(u_sum).mul_(0.5)  # |v^|^2 = 1 above the floor
    if not all_normal:
        general = torch.where(normal, general, t_sum)
    return general.mul_(inverse.square()).mul_(s)


def grad_x(k, x, prototypes, a, beta, row_sums: bool, x_normal, extra):
    r""":math:`K P + (\beta + \mathrm{extra})\, x`; without ``row_sums``, :math:`\beta x` of the rows above the
    floor is the projection of :math:`K P` on their tangent space (``beta`` then holds the floor rows' only, or
    None). ``extra``: the flagged pairs' part along :math:`x` (or None)."""
    if row_sums:
        return torch.mm(k, prototypes).addcmul_(x, (beta if extra is None else beta + extra).unsqueeze(1))
    grad_x = torch.mm(k, prototypes)
    projection = (x * grad_x).sum(dim=1).mul_(a.square()).neg_()
    if beta is not None:
        projection = torch.where(x_normal, projection, beta)
    if extra is not None:
        projection = projection + extra
    return grad_x.addcmul_(x, projection.unsqueeze(1))
