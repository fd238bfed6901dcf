r"""Isotropic Gaussian mixtures: a data distribution whose marginals on every Gaussian path are closed form.

With :math:`p_{data} = \sum_k w_k N(m_k, s_k^2 I)` and :math:`x = \alpha_t x_{data} + \beta_t \varepsilon`,
component k becomes :math:`N(\alpha_t m_k, v_k I)` with :math:`v_k = \alpha_t^2 s_k^2 + \beta_t^2`, and with
the responsibilities :math:`r_k(x) \propto w_k N(x; \alpha_t m_k, v_k I)`:

.. math::
    E[x_{data}|x] = \sum_k r_k \big(m_k + \alpha_t s_k^2 (x - \alpha_t m_k) / v_k\big), \qquad
    E[\varepsilon|x] = \sum_k r_k\, \beta_t (x - \alpha_t m_k) / v_k,

    u_t(x) = \alpha'_t E[x_{data}|x] + \beta'_t E[\varepsilon|x], \qquad
    \nabla_x \log p_t(x) = -\sum_k r_k (x - \alpha_t m_k) / v_k.

No formula divides by alpha_t or beta_t, so every field is finite on all of [0, 1] when all s_k > 0.

With a class label :math:`c_k` per component, the class-conditional data distribution is the mixture of the
components of class y with weights :math:`w_k / W_y`, :math:`W_y = \sum_{c_k = y} w_k`: the same formulas
with the responsibilities restricted to those components. Classifier-free guidance with weight w gives
:math:`(1 + w) f(x|y) - w f(x)` for any field f (:class:`~flowscore.marginals.Marginal`): the closed-form
reference for guidance elsewhere.
"""

from __future__ import annotations

import math

import torch

from . import _validate
from .marginals import Marginal, flat_batch, per_row
from .paths import GaussianPath, get_path


def _component_log_probs(x: torch.Tensor, centers: torch.Tensor, var: torch.Tensor, log_w: torch.Tensor):
    """``(B, K)`` ``log w_k + log N(x; centers_k, var_k I)`` and ``(B, K, D)`` residuals ``x - centers_k``.

    ``x`` is ``(B, D)``, ``centers`` ``(K, D)`` or ``(B, K, D)``, ``var`` ``(K,)`` or ``(B, K)`` (> 0).
    """
    d = x.shape[1]
    residual = x.unsqueeze(1) - centers
    log_n = -0.5 * residual.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
    return log_w + log_n, residual


class GaussianMixture:
    r"""The mixture :math:`\sum_k w_k N(m_k, s_k^2 I)` of isotropic Gaussians.

    Args:
        means: ``(K, *dims)`` component means (e.g. ``(K, D)``), finite floats.
        stds: ``(K,)`` component standard deviations, all > 0, with squares representable in the dtype of
            ``means`` (in float32, ``1e-19 <= s <= 1e19``; use float64 beyond, or
            :class:`~flowscore.marginals.EmpiricalMarginal` for point masses).
        weights: ``(K,)`` non-negative, summing to 1 (within 1e-5); default uniform.
        path: optional default path for the marginal methods below.
        labels: optional ``(K,)`` integer class of each component, ``0..C-1``: the marginal's fields then
            take ``y=`` (``(B,)`` classes, ``-1`` = unconditional) and ``guidance=``.

    ``stds`` and ``weights`` are converted to the dtype and device of ``means``. The closed-form marginals
    on a path: ``gm.marginal(path)`` (an object like ``EmpiricalMarginal``), or directly
    ``gm.posterior_mean(x, t, path)``, ``gm.velocity``, ``gm.score``, ``gm.noise``, ``gm.log_prob`` (``path``
    may be omitted when given here). They are computed in float64 and returned in the dtype of ``means``
    (a ``ValueError`` where a value exceeds that dtype's range).
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor | None = None,
        path: GaussianPath | str | None = None,
        *,
        labels: torch.Tensor | None = None,
    ):
        means = _validate.batch(means, "means")
        _validate.finite(means, "means")
        k = means.shape[0]
        stds = self._vector(stds, "stds", k, means)
        if not bool((stds > 0).all()):
            raise ValueError("stds must all be > 0 (a zero std is a point mass: use EmpiricalMarginal)")
        info = torch.finfo(means.dtype)
        squares = stds.pow(2)
        if not bool(((squares >= info.tiny) & (squares <= info.max)).all()):
            bad = float(stds[(squares < info.tiny) | (squares > info.max)][0])
            raise ValueError(
                f"stds holds {bad:g}, whose square is not representable in {means.dtype} "
                f"(it must lie in [{math.sqrt(info.tiny):.1g}, {math.sqrt(info.max):.1g}]); use float64 "
                "means and stds, or EmpiricalMarginal for point masses"
            )
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=means.dtype, device=means.device)
        weights = self._vector(weights, "weights", k, means)
        if bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-5:
            raise ValueError(f"weights must be non-negative and sum to 1, got sum {float(weights.sum()):g}")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        self.point_shape = means.shape[1:]
        self._flat_means = means.reshape(k, -1)
        self.labels = None if labels is None else _validate.class_labels(labels, k).to(means.device)
        self.num_classes = None if self.labels is None else int(self.labels.max()) + 1
        self.path = None if path is None else get_path(path)
        # float64 copies for the closed forms (no underflow of s^2 or of the densities)
        self._means64 = self._flat_means.double()
        self._var64 = self.stds.double().pow(2)
        self._log_w64 = torch.log(self.weights.double())

    @staticmethod
    def _vector(v: object, name: str, k: int, like: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device) if not isinstance(v, torch.Tensor) else v
        v = _validate.tensor(v, name).to(device=like.device, dtype=like.dtype)
        if v.shape != (k,):
            raise ValueError(f"{name} must be shaped (K,) = ({k},) like the means, got {tuple(v.shape)}")
        return _validate.finite(v, name)

    def __len__(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        classes = "" if self.num_classes is None else f", num_classes={self.num_classes}"
        return f"GaussianMixture(K={len(self)}, point_shape={tuple(self.point_shape)}{classes})"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws, shaped ``(n, *dims)``: ``k ~ Categorical(weights)``, ``x = m_k + s_k * N(0, I)``."""
        return self.sample_with_labels(n, generator)[0]

    def sample_with_labels(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws ``(n, *dims)`` and their classes ``(n,)`` (the class of the component drawn; all
        ``-1`` for a mixture without labels)."""
        _validate.positive_int(n, "n")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(
            (n, self._flat_means.shape[1]),
            generator=generator,
            dtype=self.means.dtype,
            device=self.means.device,
        )
        flat = self._flat_means[k] + self.stds[k].unsqueeze(1) * noise
        labels = torch.full_like(k, -1) if self.labels is None else self.labels[k]
        return flat.reshape((n,) + tuple(self.point_shape)), labels

    def log_prob_data(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` :math:`\\log \\sum_k w_k N(x; m_k, s_k^2 I)` at ``x`` (``(B, *dims)``)."""
        flat = flat_batch(_validate.tensor(x, "x"), self.point_shape)
        _validate.same_kind(self.means, x, "means", "x")
        logits, _ = _component_log_probs(flat.double(), self._means64, self._var64, self._log_w64)
        return torch.logsumexp(logits, 1).to(x.dtype)

    def marginal(self, path: GaussianPath | str | None = None) -> MixtureMarginal:
        """The closed-form marginal of this mixture on ``path`` (same methods as ``EmpiricalMarginal``)."""
        if path is None:
            if self.path is None:
                raise ValueError("no path: pass path=, or give GaussianMixture(..., path=NAME)")
            path = self.path
        return MixtureMarginal(self, path)

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor | float, path=None) -> torch.Tensor:
        """E[x_data | x_t = x] on ``path``; see :class:`MixtureMarginal`."""
        return self.marginal(path).posterior_mean(x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, path=None) -> torch.Tensor:
        """The marginal velocity u_t(x) on ``path``."""
        return self.marginal(path).velocity(x, t)

    def score(self, x: torch.Tensor, t: torch.Tensor | float, path=None) -> torch.Tensor:
        """The marginal score grad_x log p_t(x) on ``path``."""
        return self.marginal(path).score(x, t)

    def noise(self, x: torch.Tensor, t: torch.Tensor | float, path=None) -> torch.Tensor:
        """E[noise | x_t = x] on ``path``."""
        return self.marginal(path).noise(x, t)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float, path=None) -> torch.Tensor:
        """``(B,)`` log p_t(x) on ``path`` (``log_prob_data`` is the data density itself)."""
        return self.marginal(path).log_prob(x, t)

    def flow_map(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        s: torch.Tensor | float,
        path=None,
        rtol: float = 1e-8,
        atol: float = 1e-8,
    ) -> torch.Tensor:
        """The exact flow map X(x, t, s) ``(B, *dims)`` on ``path``: the probability-flow ODE of the
        closed-form marginal velocity solved in float64 (:meth:`flowscore.marginals.Marginal.flow_map`; labels
        and guidance there, on ``gm.marginal(path)``)."""
        return self.marginal(path).flow_map(x, t, s, rtol=rtol, atol=atol)


class MixtureMarginal(Marginal):
    """Closed-form marginal fields of a :class:`GaussianMixture` on a Gaussian path.

    Methods ``posterior_mean``, ``noise``, ``velocity``, ``score``, ``field``, ``log_prob`` (each with
    optional class labels ``y`` and, for the fields, ``guidance``) as in
    :class:`~flowscore.marginals.EmpiricalMarginal`, from the formulas of the module docstring: finite on
    all of [0, 1] (no division by alpha_t or beta_t; the variances v_k >= alpha_t^2 s_k^2 + beta_t^2 > 0).
    Computed in float64; queries ``x`` must share the dtype and device of the mixture's means.
    """

    _solve_dtype = torch.float64  # the closed forms take any dtype: the flow map solves in float64

    def __init__(self, mixture: GaussianMixture, path: GaussianPath | str):
        if not isinstance(mixture, GaussianMixture):
            raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture
        self.path = get_path(path) if isinstance(path, str) else path
        if not isinstance(self.path, GaussianPath):
            raise ValueError(f"path must be a GaussianPath or a path name, got {type(path).__name__}")
        self.point_shape = mixture.point_shape
        self.dtype, self.device = mixture.means.dtype, mixture.means.device
        self.num_classes = mixture.num_classes

    def __repr__(self) -> str:
        return f"MixtureMarginal({self.mixture!r}, path={self.path!r})"

    def sample_data(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of ``x_data`` ``(n, *dims)`` and their classes ``(n,)`` (-1 without labels)."""
        return self.mixture.sample_with_labels(n, generator)

    def _components(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """Float64 schedule ``(alpha, beta, d_alpha, d_beta)`` as ``(B, 1)``, responsibilities ``r``
        ``(B, K)``, ``z = (x - alpha m_k) / v_k`` ``(B, K, D)`` and the ``(B, K)`` log-joint
        ``log w_k N(x; alpha m_k, v_k I)``; rows with a class ``y >= 0`` only weigh that class's components
        (their other log-joints are -inf)."""
        b = x.shape[0]
        x = x.double()
        schedule = self.path.schedule(t.double()).map(lambda v: per_row(v, b))
        alpha, beta, _, _ = schedule
        mix = self.mixture
        var = alpha.pow(2) * mix._var64 + beta.pow(2)  # (B, K)
        centers = alpha.unsqueeze(2) * mix._means64  # (B, K, D)
        logits, residual = _component_log_probs(x, centers, var, mix._log_w64)
        if y is not None:
            other = (y[:, None] >= 0) & (mix.labels[None, :] != y[:, None])
            logits = logits.masked_fill(other, -math.inf)
            missing = ~torch.isfinite(logits.amax(1))
            if bool(missing.any()):
                label = int(y[missing][0])
                raise ValueError(f"y asks for class {label}, which has no component in this mixture")
        resp = torch.softmax(logits, 1)
        return schedule, resp, residual / var.unsqueeze(2), logits

    def _flat_field(
        self, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        schedule, resp, z = self._components(x, t, y)[:3]
        alpha, beta, d_alpha, _ = schedule
        weighted_z = torch.einsum("bk,bkd->bd", resp, z)  # sum_k r_k (x - alpha m_k) / v_k
        if kind == "score":
            return -weighted_z
        noise = beta * weighted_z
        if kind == "noise":
            return noise
        mix = self.mixture
        data = resp @ mix._means64 + alpha * torch.einsum("bk,bkd->bd", resp * mix._var64, z)
        # u = alpha' E[x_data|x] + beta' E[noise|x]; beta' beta in closed form (finite at t = 1)
        return data if kind == "data" else d_alpha * data + schedule.beta_d_beta * weighted_z

    def _flat_log_prob(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log p_t(x)``, or ``log p_t(x|y) = logsumexp_{c_k = y}(log w_k N) - log W_y`` for labelled
        rows."""
        out = torch.logsumexp(self._components(x, t, y)[3], 1)
        if y is not None:
            mix = self.mixture
            class_weight = torch.zeros(mix.num_classes, dtype=torch.float64, device=x.device)
            class_weight.index_add_(0, mix.labels, mix.weights.double())
            out = out - torch.where(y >= 0, class_weight[y.clamp_min(0)].log(), 0.0)
        return out
