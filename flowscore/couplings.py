r"""Which data point goes with which noise: minibatch couplings, and reference-batch targets.

Plain CFM/DSM pair every data point with an independent draw of noise and regress on the conditional target
of that one pair. This module changes the pairing in two ways, on every Gaussian path.

**Couplings** (:func:`couple`, ``coupling=`` of :func:`flowscore.losses.cfm` / ``dsm``). ``"ot"`` re-pairs the
B noise draws of a batch with its B data points by the permutation that minimises :math:`\sum_i \lVert
x_{data,i} - \varepsilon_{j(i)}\rVert^2` (exact minibatch optimal transport, POT's ``ot.emd``; Tong et al.
2023, Pooladian et al. 2023). ``"sinkhorn"`` solves the entropic problem (POT's ``ot.sinkhorn``, in the log
domain when ``reg`` is small) on the cost divided by its batch mean, with regularisation ``reg`` (so ``reg``
does not depend on the data's scale or dimension; ``reg_absolute=True``: ``reg`` is the absolute epsilon, as
Schrödinger-bridge CFM needs, :mod:`flowscore.bridges`), and draws for each data point i its noise index from
row i of the plan (:func:`entropic_plan` returns the plan itself). With labels ``y`` the pairing stays within
a label (class-aware OT: one problem per label). Every data point keeps its row, its time and its label; only
the noise moves. Under ``torchrun``, :func:`couple`
must see the GLOBAL batch (the same on every rank) before it is sliced, so that 1 and N processes train on the
same pairs; the trainer does so (``TrainConfig.coupling``, ``--coupling``). The exact assignment is the same
on every path (it depends on the inner products of noise and data only). The regression then learns the
marginal velocity of the coupled path, not ``EmpiricalMarginal.velocity``: see docs/theory.md, "Couplings and
reference targets".

**Reference targets** (:func:`reference_target`, ``reference=`` of ``cfm`` / ``dsm``; the stable target
field of Xu et al. 2023, there for EDM's VE score only). The target of sample i is the posterior average of
the conditional targets over the candidate set :math:`S_i = \{x_{data,i}\} \cup \{r_1, \dots, r_R\}`,
with self-normalised weights :math:`w_c \propto p_t(x_i \mid c) = N(x_i; \alpha_t c, \beta_t^2 I)`. All
conditional targets are affine in the data point with one coefficient ``c_value`` (``path.coefficients(t,
"data", kind)``), so the average is the plain target plus a correction:

.. math::  \text{target}_i = \text{target}(x_{data,i}, \varepsilon_i) + c_{value}(t)\,
           \Big(\textstyle\sum_{c \in S_i} w_c\, c - x_{data,i}\Big).

An own data point that is also a reference point (equal row by row) is counted once, so with the whole data
set as reference the target is the exact FM/SM target, and with no reference it is the plain CFM/DSM target.
With reference points drawn uniformly WITHOUT replacement from the data, independently of the batch, the
candidate set is exchangeable (the own point is a uniform member of it), so the target is
:math:`E[\text{conditional target} \mid x, S_i]` and its expectation given x is the marginal field: the
gradient stays unbiased at any reference size, and its variance drops once R is well above the batch size (the
references are shared by the batch, so their own sampling error does not average out over it). The posterior
over the references is streamed by :class:`~flowscore.marginals.EmpiricalMarginal`'s kernel (one matmul per
chunk, O(B x chunk) memory); with labels, references of the sample's label only (all of them for ``y = -1``).
The trainer draws ``TrainConfig.reference_size`` references per step (``--reference-size``), the same on every
rank.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _validate
from .conditioning import check_labels
from .marginals import EmpiricalMarginal, per_row
from .paths import GaussianPath

COUPLINGS = ("independent", "ot", "sinkhorn")
"""``independent`` (plain), ``ot`` (exact minibatch OT), ``sinkhorn`` (entropic OT, sampled pairs)."""
DEFAULT_REG = 0.05
"""Default Sinkhorn regularisation, relative to the batch's mean squared distance."""
_EMD_MAX_ITER = 10_000_000
_SINKHORN_PLAIN_MAX = 300.0  # largest cost / reg for the plain (non-log) Sinkhorn iteration
_SINKHORN_MAX_ITER = 2000


# -- couplings -----------------------------------------------------------------------------------------------
def _import_ot():
    try:
        import ot
    except ImportError:
        raise ValueError(
            "coupling='ot' or 'sinkhorn' needs POT: pip install pot (or flowscore[metrics])"
        ) from None
    return ot


def _squared_distances(x_data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` float64 costs ``||x_data_i - noise_j||^2`` of flat batches."""
    a, b = x_data.double(), noise.double()
    cost = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T
    return cost.clamp_min_(0)


def _exact_pairing(cost: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the permutation ``j(i)`` minimising ``sum_i cost[i, j(i)]`` (``ot.emd``, network simplex).

    With equal uniform weights the optimal plan is a vertex of the Birkhoff polytope, a permutation matrix
    divided by B, so each row's nonzero entry is its partner.
    """
    ot = _import_ot()
    b = cost.shape[0]
    weights = torch.full((b,), 1.0 / b, dtype=torch.float64)
    plan = ot.emd(weights.numpy(), weights.numpy(), cost.cpu().numpy(), numItermax=_EMD_MAX_ITER)
    pairing = torch.from_numpy(plan.argmax(1)).to(cost.device)
    if torch.bincount(pairing, minlength=b).max() != 1:
        raise RuntimeError("ot.emd did not return a permutation plan; is the cost finite?")
    return pairing


def _sinkhorn_plan(cost: torch.Tensor, reg: float, absolute: bool = False) -> torch.Tensor | object:
    """The ``(B, B)`` float64 entropic plan of ``cost`` (divided by its mean unless ``absolute``) at ``reg``.

    The plain iteration while ``exp(-cost / reg)`` stays well above float64's underflow, else (small reg,
    e.g. SB-CFM's ``2 sigma^2`` with a small sigma) one that does not underflow: on the CPU POT's
    ``sinkhorn_stabilized`` (the plain iteration with the large potentials absorbed into the kernel: matrix
    products, an order of magnitude faster there than the log domain; the log domain where its kernel
    underflows too), elsewhere the log domain on the cost's device. A numpy array on the CPU (POT's torch
    backend costs more per iteration there), else a tensor on the cost's device (POT's numpy log-sum-exp is
    slower).
    """
    ot = _import_ot()
    b = cost.shape[0]
    scaled = cost if absolute else cost / cost.mean().clamp_min(torch.finfo(torch.float64).tiny)
    plain = float(scaled.max()) < _SINKHORN_PLAIN_MAX * reg
    on_cpu = cost.device.type == "cpu"
    method = "sinkhorn" if plain else "sinkhorn_stabilized" if on_cpu else "sinkhorn_log"
    weights = torch.full((b,), 1.0 / b, dtype=torch.float64, device=cost.device)
    if on_cpu:
        plan = ot.sinkhorn(
            weights.numpy(), weights.numpy(), scaled.numpy(), reg, method=method,
            numItermax=_SINKHORN_MAX_ITER, stopThr=1e-6,
        )  # fmt: skip
        if plain or bool(np.isfinite(plan).all() and (plan.sum(1) > 0).all()):
            return plan
        method = "sinkhorn_log"  # the stabilised kernel underflowed too (reg far below the costs)
    return ot.sinkhorn(
        weights, weights, scaled, reg, method=method, numItermax=_SINKHORN_MAX_ITER, stopThr=1e-6
    )


def _sinkhorn_pairing(
    cost: torch.Tensor, reg: float, generator: torch.Generator | None, absolute: bool = False
) -> torch.Tensor:
    """``(B,)`` noise index of each data row, drawn from row i of the plan of :func:`_sinkhorn_plan`."""
    plan = _sinkhorn_plan(cost, reg, absolute)
    plan = plan if isinstance(plan, torch.Tensor) else torch.from_numpy(plan)
    device = generator.device if generator is not None else cost.device
    return torch.multinomial(plan.to(device), 1, generator=generator).squeeze(1).to(cost.device)


def entropic_plan(
    x_data: torch.Tensor, noise: torch.Tensor, reg: float = DEFAULT_REG, *, reg_absolute: bool = False
) -> torch.Tensor:
    r"""``(B, B)`` float64 entropic OT plan between the uniform laws on the rows of ``x_data`` (rows of the
    plan) and of ``noise`` (columns): the minimiser of :math:`\langle P, C\rangle - \epsilon H(P)` with
    :math:`C_{ij} = \lVert x_{data,i} - \varepsilon_j\rVert^2` and marginals 1/B (POT's ``ot.sinkhorn``).

    ``reg_absolute=False`` (what ``coupling="sinkhorn"`` uses by default): :math:`\epsilon` = ``reg`` times
    the batch's mean cost, so ``reg`` does not depend on the data's scale. ``reg_absolute=True``:
    :math:`\epsilon` = ``reg`` in the units of the squared distances (Schrödinger-bridge CFM uses
    :math:`\epsilon = 2\sigma^2`, :func:`flowscore.bridges.sb_couple`). ``noise`` may be any source batch.
    """
    x_data = _validate.finite(_validate.batch(x_data, "x_data"), "x_data")
    noise = _validate.finite(_validate.tensor(noise, "noise"), "noise")
    _validate.same_shape(x_data, noise, "x_data", "noise")
    reg = _validate.number(reg, "coupling_reg", 0.0, low_open=True)
    b = x_data.shape[0]
    plan = _sinkhorn_plan(_squared_distances(x_data.reshape(b, -1), noise.reshape(b, -1)), reg, reg_absolute)
    return (plan if isinstance(plan, torch.Tensor) else torch.from_numpy(plan)).to(x_data.device)


def pairing(
    x_data: torch.Tensor,
    noise: torch.Tensor,
    coupling: str = "ot",
    *,
    reg: float = DEFAULT_REG,
    reg_absolute: bool = False,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B,)`` long: the index ``j(i)`` of the noise paired with data point ``i`` under ``coupling``.

    Args:
        x_data: ``(B, *dims)`` data batch.
        noise: ``(B, *dims)`` noise batch.
        coupling: ``"independent"`` (the identity), ``"ot"`` (a permutation: exact minibatch OT, squared
            Euclidean cost) or ``"sinkhorn"`` (each ``j(i)`` drawn from row i of the entropic plan; indices
            may repeat).
        reg: Sinkhorn regularisation relative to the mean cost (``"sinkhorn"`` only); smaller is closer to
            ``"ot"`` and takes more iterations.
        reg_absolute: ``reg`` is the absolute epsilon, in the units of the squared distances, not relative
            to the batch's mean cost (:func:`entropic_plan`; SB-CFM's ``2 sigma^2``).
        y: ``(B,)`` integer labels: pairs are made within each label (``-1`` is a label of its own).
        generator: draws the Sinkhorn pairs (on its device). ``"ot"`` draws nothing: it is deterministic.
    """
    x_data = _validate.finite(_validate.batch(x_data, "x_data"), "x_data")
    noise = _validate.finite(_validate.tensor(noise, "noise"), "noise")
    _validate.same_shape(x_data, noise, "x_data", "noise")
    _validate.choice(coupling, COUPLINGS, "coupling")
    reg = _validate.number(reg, "coupling_reg", 0.0, low_open=True)
    b = x_data.shape[0]
    index = torch.arange(b, device=x_data.device)
    if coupling == "independent":
        return index
    groups = [index] if y is None else [index[y == label] for label in torch.unique(check_labels(y, b))]
    flat_data, flat_noise = x_data.reshape(b, -1), noise.reshape(b, -1)
    paired = index.clone()
    for rows in groups:
        if rows.numel() < 2:
            continue
        cost = _squared_distances(flat_data[rows], flat_noise[rows])
        if coupling == "ot":
            local = _exact_pairing(cost)
        else:
            local = _sinkhorn_pairing(cost, reg, generator, reg_absolute)
        paired[rows] = rows[local]
    return paired


def couple(
    x_data: torch.Tensor,
    noise: torch.Tensor,
    coupling: str = "independent",
    *,
    reg: float = DEFAULT_REG,
    reg_absolute: bool = False,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``noise`` reordered to go with ``x_data``: ``noise[pairing(x_data, noise, coupling, ...)]``.

    ``noise`` itself for ``"independent"``. Arguments as in :func:`pairing`. The trainer calls this on the
    global batch, before each rank takes its slice.
    """
    if coupling == "independent":
        return noise
    return noise[
        pairing(x_data, noise, coupling, reg=reg, reg_absolute=reg_absolute, y=y, generator=generator)
    ]


# -- reference targets ---------------------------------------------------------------------------------------
def _row_keys(flat: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64 hash of each row's bits: a weighted sum of their 16-bit pieces, exact in int64."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    words = (flat + 0.0).contiguous().view(bits).long()  # + 0.0 turns -0.0 into 0.0
    pieces = torch.cat([(words >> s) & 0xFFFF for s in range(0, 8 * flat.element_size(), 16)], 1)
    n = torch.arange(pieces.shape[1], dtype=torch.int64, device=flat.device)
    weights = (n * 2654435761 + 40503) % 1_048_573 + 1  # pseudo-random in [1, 2^20): products stay < 2^36
    return (pieces * weights).sum(1)


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether each row of ``rows`` (``(B, D)``) equals some row of ``table`` (``(R, D)``).

    A hash of the bits finds the candidate in O((B + R) D) (no B x R x D comparison); the candidate is then
    compared exactly.
    """
    if table.shape[0] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    keys, table_keys = _row_keys(rows), _row_keys(table)
    sorted_keys, order = table_keys.sort()
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=table.shape[0] - 1)
    candidate = order[pos]
    return (sorted_keys[pos] == keys) & (table[candidate] == rows).all(1)


_DIRECT_ENTRIES = 1 << 22
"""Above this many ``B x R`` pairs of batch rows and references, :func:`_posterior_shift` streams the
references through ``EmpiricalMarginal``'s kernel; at most this many, it computes every distance at once."""


def _posterior_shift(
    path: GaussianPath, x: torch.Tensor, own: torch.Tensor, t: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    r"""``(B, D)`` float64 ``sum_{c in S} w_c c - own`` over ``S = {own} + reference`` at the flat ``x``.

    Small problems (``B R`` at most :data:`_DIRECT_ENTRIES`, e.g. a batch against a few hundred references)
    take every float64 squared distance at once, :math:`|x|^2 - 2\alpha\, x \cdot c + \alpha^2 |c|^2`, and one
    softmax. Larger ones take the posterior over the references from the streamed kernel of
    ``EmpiricalMarginal`` relative to its anchor ``a`` (the most likely reference); the own point joins with
    log-weight ``l_own - l_a``, both exact float64 distances. An own point that is also a reference counts
    once. Where beta = 0 the posterior is the own
    point: shift 0.
    """
    b = x.shape[0]
    alpha, beta = (per_row(v, b).double() for v in path.schedule(t)[:2])
    singular = beta == 0
    beta = torch.where(singular, torch.ones_like(beta), beta)
    x64, own64 = x.double(), own.double()

    def log_weight(point: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x64 - alpha * point) / beta).pow(2).sum(-1)

    repeated = rows_in(own, reference)
    if b * reference.shape[0] <= _DIRECT_ENTRIES:
        ref64 = reference.double()
        cross = x64 @ ref64.T
        square = x64.pow(2).sum(1, keepdim=True) - 2 * alpha * cross + alpha**2 * ref64.pow(2).sum(1)
        logs = -0.5 * square.clamp_min(0.0) / beta**2
        own_log = log_weight(own64).masked_fill(repeated, -torch.inf)
        w_ref = torch.softmax(torch.cat([own_log[:, None], logs], 1), 1)[:, 1:]
        shift = w_ref @ ref64 - w_ref.sum(1, keepdim=True) * own64
        return shift.masked_fill(singular, 0.0)
    posterior = EmpiricalMarginal(reference, path)._posterior(x, t)
    anchor, offset, log_sum = posterior.anchor, posterior.offset, posterior.log_sum
    own_log = (log_weight(own64) - log_weight(anchor)).masked_fill(repeated, -torch.inf)
    top = torch.maximum(own_log, log_sum)
    w_ref = torch.exp(log_sum - top) / (torch.exp(own_log - top) + torch.exp(log_sum - top))
    return (w_ref.unsqueeze(1) * (anchor + offset - own64)).masked_fill(singular, 0.0)


def reference_target(
    path: GaussianPath,
    x_data: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    reference: torch.Tensor | None,
    kind: str = "velocity",
    *,
    y: torch.Tensor | None = None,
    reference_y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``(B, *dims)`` target of ``kind`` at ``x = path.sample(x_data, t, noise)``, averaged over the
    posterior on ``{x_data_i} + reference`` (module docstring); ``path.target`` when ``reference`` is None.

    Args:
        path: the Gaussian path.
        x_data: ``(B, *dims)`` data batch; ``t``: ``(B,)`` or 0-dim times; ``noise``: ``(B, *dims)``.
        reference: ``(R, *dims)`` reference points (dtype and device of ``x_data``), or None.
        kind: ``"velocity"``, ``"score"``, ``"noise"`` or ``"data"``: the conditional target averaged.
        y: ``(B,)`` labels of the batch: with them a sample's posterior runs over the references of its
            own label (over all references where ``y = -1``, the unconditional branch); needs ``reference_y``.
        reference_y: ``(R,)`` labels of the references.

    The correction multiplies by ``path.coefficients(t, "data", kind)[0]`` (``Delta_v / beta`` for the
    velocity, ``alpha / beta^2`` for the score), finite wherever beta > 0; where beta = 0 the posterior is the
    own point and the target the plain one. Cost: one streamed pass over the references (per label).
    """
    target = path.target(x_data, t, noise, kind)
    if reference is None:
        if reference_y is not None:
            raise ValueError("reference_y is given without reference; pass both or neither")
        return target
    reference = _validate.finite(_validate.tensor(reference, "reference"), "reference")
    _validate.same_kind(x_data, reference, "x_data", "reference")
    if reference.dim() != x_data.dim() or reference.shape[1:] != x_data.shape[1:]:
        raise ValueError(
            f"reference must be shaped (R, {', '.join(map(str, x_data.shape[1:]))}) like the data points, "
            f"got {tuple(reference.shape)}"
        )
    b, r = x_data.shape[0], reference.shape[0]
    if (y is None) != (reference_y is None):
        raise ValueError(
            "with labels, reference targets need both y (the batch's labels) and reference_y (the "
            "references' labels), so that each sample's posterior runs over references of its own label"
        )
    t = _validate.time(t, like=x_data).expand(b)
    flat = path.sample(x_data, t, noise).reshape(b, -1)
    own = x_data.reshape(b, -1)
    refs = reference.reshape(r, own.shape[1])
    shift = torch.zeros(b, own.shape[1], dtype=torch.float64, device=own.device)
    if y is None and r:
        shift = _posterior_shift(path, flat, own, t, refs)
    elif y is not None:
        y, reference_y = check_labels(y, b), check_labels(reference_y, r, "reference_y")
        for label in y.unique():
            rows, table = y == label, refs if label == -1 else refs[reference_y == label]
            if table.shape[0]:
                shift[rows] = _posterior_shift(path, flat[rows], own[rows], t[rows], table)
    singular = path.schedule(t)[1] == 0
    safe_t = torch.where(singular, torch.full_like(t, 0.5), t)
    c_value = path.coefficients(safe_t.double(), "data", kind)[0].masked_fill(singular, 0.0)
    return target + (c_value.unsqueeze(1) * shift).to(target.dtype).reshape(target.shape)


__all__ = ["COUPLINGS", "DEFAULT_REG", "couple", "entropic_plan", "pairing", "reference_target", "rows_in"]
