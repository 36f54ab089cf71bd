r"""The power-function EMA of Karras et al. (2024, EDM2), in float64: widths, momenta and the synthesis weights.

A power-function EMA at iteration :math:`t` weighs the student at
:math:`\tau \in [0, t]` by the density :math:`p_\gamma(\tau; t) = (\gamma + 1)\,
\tau^\gamma / t^{\gamma + 1}`. Its width is given relative to the run so far:
:math:`\sigma_{rel}` is the profile's standard deviation divided by :math:`t`
(EDM2, Eq. 123), so at iteration :math:`t` the EMA spreads over about
:math:`\sigma_{rel}\,t` iterations and its mean lags :math:`t / (\gamma + 2)`
behind :math:`t`.

>>> round(sigma_rel_to_gamma(0.05), 4), round(sigma_rel_to_gamma(0.10), 4)   # EDM2's two profiles
(16.9722, 6.9372)
>>> round(gamma_to_sigma_rel(sigma_rel_to_gamma(0.07)), 12)
0.07
>>> 0.05 * 20_000    # at iteration 20,000, sigma_rel 0.05 is a profile 1,000 iterations wide (one std)
1000.0
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ignite_ema._checks import check_real

__all__ = [
    "SIGMA_REL_MAX",
    "gamma_to_sigma_rel",
    "power_momentum",
    "profile_inner_products",
    "sigma_rel_to_gamma",
    "synthesis_coefficients",
]

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
"""The widest power profile with :math:`\\gamma \\ge 0`: :math:`\\gamma = 0`, the uniform average of the run."""

_Floats = NDArray[np.float64]


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = \sqrt{(\gamma + 1) / ((\gamma + 2)^2 (\gamma + 3))}` (EDM2, Eq. 123).

    Args:
        gamma: the profile's exponent, at least 0.
    """
    gamma = check_real("gamma", gamma)
    if gamma < 0:
        raise ValueError(
            f"gamma must be at least 0 (gamma = 0 is the uniform average of the run; below it the profile weighs "
            f"early iterations more than late ones); found {gamma}"
        )
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""The exponent :math:`\gamma \ge 0` of the power profile of relative width ``sigma_rel`` (EDM2, Algorithm 2).

    Squaring Eq. 123 gives the cubic :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma_{rel}^{-2})\,\gamma +
    12 - \sigma_{rel}^{-2} = 0`; its largest real root is the one, polished by Newton's method.

    Args:
        sigma_rel: in (0, 1/sqrt(12)], about 0.2887.
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    k = sigma_rel**-2.0
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    gamma = max(0.0, float(roots.real[np.abs(roots.imag) < 1e-9].max()))
    for _ in range(2):  # f(g) = (g + 2)^2 (g + 3) - k (g + 1), increasing past its largest root
        value = (gamma + 2.0) ** 2 * (gamma + 3.0) - k * (gamma + 1.0)
        slope = 2.0 * (gamma + 2.0) * (gamma + 3.0) + (gamma + 2.0) ** 2 - k
        if slope > 0:
            gamma = max(0.0, gamma - value / slope)
    return gamma


def check_sigma_rel(sigma_rel: object, name: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float in (0, 1/sqrt(12)], or an error that says why the math stops there."""
    value = check_real(name, sigma_rel)
    # A hair of slack above 1/sqrt(12): its float and a value typed as 0.28867513459481287 round either way.
    if not 0.0 < value <= SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(
            f"{name} must lie in (0, {SIGMA_REL_MAX:.6f}]; found {value}. sigma_rel is the width of the power "
            "profile relative to the run: 1/sqrt(12) is the uniform average of all iterations so far (gamma = 0); "
            "a wider profile would need gamma < 0 (weighing early iterations more than late ones), and none is "
            "wider than 0.3003"
        )
    return value


def power_momentum(gamma: float, iteration: int, delta: int) -> float:
    r"""The student's weight :math:`1 - \beta`, :math:`\beta = (1 - \Delta / t)^{\gamma + 1}` (EDM2, Eq. 127).

    ``1`` when ``delta == iteration`` (the first update copies). Computed as
    ``-expm1((gamma + 1) * log1p(-delta / iteration))``, without cancellation
    when ``delta`` is small against ``iteration``.

    Args:
        gamma: the profile's exponent.
        iteration: :math:`t`, the iteration of this update (at least 1).
        delta: :math:`\Delta`, iterations since the previous update (1 to ``iteration``).
    """
    if not 1 <= delta <= iteration:
        raise ValueError(f"expected 1 <= delta <= iteration; found delta={delta}, iteration={iteration}")
    if delta == iteration:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-delta / iteration))


def profile_inner_products(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> _Floats:
    r""":math:`\int_0^\infty p_{\gamma_a}(\tau; t_a)\, p_{\gamma_b}(\tau; t_b)\, d\tau`, broadcast (EDM2, Eq. 151).

    With :math:`m = \min(t_a, t_b)` the integral is
    :math:`\frac{(\gamma_a + 1)(\gamma_b + 1)}{\gamma_a + \gamma_b + 1}
    \frac{(m / t_a)^{\gamma_a} (m / t_b)^{\gamma_b}}{\max(t_a, t_b)}`,
    written with ratios at most 1 so that no power overflows.

    Args:
        t_a, gamma_a: times and exponents of the first profiles.
        t_b, gamma_b: those of the second, broadcast against the first.
    """
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    low = np.minimum(ta, tb)
    scale = (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0)
    result: _Floats = scale * (low / ta) ** ga * (low / tb) ** gb / np.maximum(ta, tb)
    return result


def synthesis_coefficients(
    times: ArrayLike, gammas: ArrayLike, target_time: float, target_gammas: ArrayLike
) -> _Floats:
    r"""Weights of the snapshots whose sum best approximates each target profile (EDM2, Algorithm 3), ``[n, k]``.

    The least-squares fit of :math:`p_{\gamma^*}(\cdot; t^*)` by
    :math:`\sum_i x_i\, p_{\gamma_i}(\cdot; t_i)` in :math:`L^2`: the normal
    equations :math:`A x = b`, :math:`A_{ij} = \langle p_i, p_j\rangle`,
    :math:`b_i = \langle p_i, p^*\rangle`; each column is then scaled to sum
    to 1, so that a constant student is reproduced exactly.

    Args:
        times, gammas: each snapshot's iteration and exponent.
        target_time: the iteration of the targets.
        target_gammas: the exponent of each target.
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1, 1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1, 1)
    gram = profile_inner_products(t, g, t.T, g.T)
    targets = np.asarray(target_gammas, dtype=np.float64).reshape(1, -1)
    rhs = profile_inner_products(t, g, np.full_like(targets, float(target_time)), targets)
    try:
        weights = np.asarray(np.linalg.solve(gram, rhs), dtype=np.float64)
    except np.linalg.LinAlgError:
        raise ValueError(
            "the snapshots' profiles are linearly dependent (two snapshots of the same exponent at the same "
            "iteration?), so no unique combination of them exists"
        ) from None
    result: _Floats = weights / weights.sum(axis=0, keepdims=True)
    return result
