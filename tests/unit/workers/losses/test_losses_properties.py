"""Loss library: the principled loss's properties (spec §P), numerical safety, hypothesis tests."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.losses import LOSSES, PairLogps, compute_loss

SETTINGS = settings(deadline=None, max_examples=60, derandomize=True)


def gap_batch(h: torch.Tensor, **extra: object) -> PairLogps:
    """Pairs with logit gap h: pw = h/2, pl = −h/2 against a zero reference."""
    zero = torch.zeros_like(h)
    return PairLogps(h / 2, -h / 2, zero, zero, **extra)


def principled_losses(h: torch.Tensor, **params: object) -> torch.Tensor:
    batch_fields = {
        k: params.pop(k)
        for k in ("chosen_score", "rejected_score", "preference_prob")
        if k in params
    }
    return compute_loss("principled", gap_batch(h, **batch_fields), **params).losses


def dloss_dh(name: str, h: torch.Tensor, **params: object) -> torch.Tensor:
    h = h.clone().requires_grad_()
    compute_loss(name, gap_batch(h), **params).losses.sum().backward()
    return h.grad


# --------------------------------------------------------------------------------------------------
# Principled: minimum location (float64 grid search)
# --------------------------------------------------------------------------------------------------

GRID = torch.linspace(-20.0, 80.0, 50_001, dtype=torch.float64)  # step 2e-3
STEP = float(GRID[1] - GRID[0])


def fill(x: float) -> torch.Tensor:
    return torch.full_like(GRID, x)


@pytest.mark.parametrize(
    ("params", "h_star"),
    [
        ({"target": "scores", "chosen_score": fill(1.7), "rejected_score": fill(0.5)}, 12.0),
        (
            {
                "target": "scores",
                "reward_scale": 0.5,
                "chosen_score": fill(1.7),
                "rejected_score": fill(0.5),
            },
            6.0,
        ),
        (
            {"chosen_score": fill(1.7), "rejected_score": fill(0.5), "beta": 0.05},
            24.0,
        ),  # auto -> scores
        (
            {"target": "scores", "chosen_score": fill(0.51), "rejected_score": fill(0.5)},
            0.5,
        ),  # clamped to min_target
        ({"target": "bradley_terry", "preference_prob": fill(0.9)}, math.log(9) / 0.1),
        ({"target": "bradley_terry", "target_prob": 0.6}, math.log(1.5) / 0.1),
        ({}, math.log(3) / 0.1),  # auto without scores -> bradley_terry with target_prob 0.75
        ({"target": "constant", "target_margin": 7.0}, 7.0),
        ({"target": "constant", "target_margin": 7.0, "shape": "squared"}, 7.0),
        ({"target": "constant", "target_margin": 7.0, "negative_side": "exp"}, 7.0),
    ],
)
def test_principled_minimum_is_at_the_target(params: dict, h_star: float) -> None:
    loss = principled_losses(GRID, **params)
    assert abs(GRID[loss.argmin()].item() - h_star) <= STEP
    minimum = 0.0 if params.get("shape") == "squared" else -1 / math.e
    assert loss.min().item() == pytest.approx(minimum, abs=1e-6)  # the grid misses h* by ≤ STEP/2


def test_principled_natural_shape_and_squared_shape_formulas() -> None:
    h = torch.tensor([-30.0, -1.0, 0.0, 2.0, 5.0, 40.0], dtype=torch.float64)
    z = h / 5.0
    natural = torch.where(z >= 0, -z * torch.exp(-z), -z)
    torch.testing.assert_close(principled_losses(h, target="constant", target_margin=5.0), natural)
    torch.testing.assert_close(
        principled_losses(h, target="constant", target_margin=5.0, negative_side="exp"),
        -z * torch.exp(-z),
    )
    torch.testing.assert_close(
        principled_losses(h, target="constant", target_margin=5.0, shape="squared"),
        (h - 5.0) ** 2 / 10.0,
    )


# --------------------------------------------------------------------------------------------------
# Principled vs DPO gradients
# --------------------------------------------------------------------------------------------------


def test_principled_gradient_is_bounded_by_one_over_target() -> None:
    h = torch.cat([torch.linspace(-1e4, 1e4, 20_001), torch.linspace(-50, 50, 10_001)]).double()
    for h_star in (0.5, 3.0, 11.0, 400.0):
        grad = dloss_dh("principled", h, target="constant", target_margin=h_star)
        assert grad.abs().max().item() <= 1 / h_star * (1 + 1e-12)
        assert grad[h.abs().argmin()].item() == pytest.approx(-1 / h_star)  # the tangent at h = 0


def test_pure_exp_negative_side_gradient_explodes() -> None:
    grad = dloss_dh(
        "principled",
        torch.tensor([-60.0], dtype=torch.float64),
        target="constant",
        target_margin=5.0,
        negative_side="exp",
    )
    assert grad.abs().item() > 1e4


def rejected_grad(name: str, policy_rejected: float, **params: object) -> float:
    """dL/d(policy_rejected) with pw = rw = rl = 0."""
    pl = torch.tensor([policy_rejected], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    compute_loss(name, PairLogps(zero, pl, zero, zero), **params).losses.sum().backward()
    return pl.grad.item()


def test_principled_gradient_wrt_rejected_vanishes_as_it_goes_to_minus_infinity() -> None:
    params = {"target": "constant", "target_margin": 10.0}
    grads = [rejected_grad("principled", -x, **params) for x in (20.0, 50.0, 100.0, 1000.0, 1e4)]
    assert all(abs(g1) > abs(g2) for g1, g2 in itertools.pairwise(grads))
    assert abs(grads[-1]) < 1e-300 and abs(grads[3]) < 1e-30
    # past the target the loss pulls π(y_l) back up (dL/dpl < 0); DPO always pushes it down
    assert all(g < 0 for g in grads[:3]) and all(g <= 0 for g in grads)
    assert all(rejected_grad("sigmoid", -x) > 0 for x in (20.0, 50.0, 100.0))


def test_dpo_gradient_wrt_rejected_is_beta_sigmoid() -> None:
    # DPO: dL/dpl = β·σ(−β·h) also vanishes as h → ∞, but never changes sign: DPO has no minimum
    for x in (1.0, 10.0, 100.0):
        assert rejected_grad("sigmoid", -x) == pytest.approx(
            0.1 / (1 + math.exp(0.1 * x)), rel=1e-12
        )


def test_alpha_term_gradient_is_bounded_by_alpha_beta_and_fades() -> None:
    params = {"target": "constant", "target_margin": 1e12, "alpha": 2.0, "beta": 0.1}
    near = rejected_grad("principled", 0.0, **params)
    assert near == pytest.approx(2.0 * 0.1 * 0.5 + 1e-12, rel=1e-6)  # α·β·σ(0) plus the core's 1/h*
    assert abs(rejected_grad("principled", 1e4, **params)) <= 2.0 * 0.1 + 1e-12
    # far below the reference only the core's own push 1/h* (h ≪ h*) is left
    assert rejected_grad("principled", -1e3, **params) == pytest.approx(1e-12, rel=1e-6)


def test_principled_with_huge_target_is_a_linear_push_near_zero() -> None:
    h = torch.linspace(-5, 5, 101, dtype=torch.float64)
    loss = principled_losses(h, target="constant", target_margin=1e6)
    torch.testing.assert_close(loss, -h / 1e6, rtol=1e-5, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Numerical safety at extreme log-probs, fp32 and bf16
# --------------------------------------------------------------------------------------------------

EXTREMES = [0.0, -1e-3, -1.0, -1e4]
CORNERS = torch.tensor(list(itertools.product(EXTREMES, repeat=4))).T  # 4 × 256: pw, pl, rw, rl


def extreme_batch(dtype: torch.dtype) -> PairLogps:
    pw, pl, rw, rl = (c.to(dtype).requires_grad_(i < 2) for i, c in enumerate(CORNERS))
    n = CORNERS.shape[1]
    lengths = torch.tensor([1.0, 7.0, 512.0, 4096.0], dtype=dtype).repeat(n // 4)
    frac = torch.linspace(0, 1, n, dtype=dtype)
    return PairLogps(
        pw,
        pl,
        rw,
        rl,
        lengths,
        lengths.flip(0),
        chosen_score=frac * 10,
        rejected_score=frac.flip(0) * 10,
        preference_prob=frac,
        chosen_wpo_logw=-frac * 5,
        rejected_wpo_logw=frac - 0.5,
        policy_chosen_prefix=pw * 0.5,
        policy_rejected_prefix=pl * 0.5,
        ref_chosen_prefix=rw,
        ref_rejected_prefix=rl,
        chosen_winrate=frac,
        rejected_winrate=1 - frac,
        kl_policy=pw.detach(),
        kl_ref=rl,
    )


def assert_finite_grads(loss: torch.Tensor, batch: PairLogps) -> None:
    inputs = [batch.policy_chosen, batch.policy_rejected]
    for grad in torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True):
        assert torch.isfinite(grad).all()


EXTREME_CASES = (
    [(name, {}) for name in LOSSES]
    + [("fdpo", {"divergence": d}) for d in ("forward_kl", "js_divergence", "alpha_divergence")]
    + [("principled", {"target": t}) for t in ("scores", "bradley_terry", "constant")]
    + [
        ("principled", {"shape": "squared"}),
        ("principled", {"alpha": 1.0}),
        ("robust", {"label_smoothing": 0.4}),
        ("aot", {"label_smoothing": 0.3}),
        ("cpo", {"label_smoothing": 0.2}),
    ]
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "params"), EXTREME_CASES, ids=[f"{n}-{p}" for n, p in EXTREME_CASES]
)
def test_no_nan_or_inf_for_extreme_logps(name: str, params: dict, dtype: torch.dtype) -> None:
    batch = extreme_batch(dtype)
    out = compute_loss(name, batch, **params)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.mean())
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert_finite_grads(out.mean(), batch)


# --------------------------------------------------------------------------------------------------
# Hypothesis properties
# --------------------------------------------------------------------------------------------------

logp = st.floats(-1e4, 0.0, allow_nan=False)
gap = st.floats(-1e3, 1e3, allow_nan=False)
target = st.floats(0.5, 1e3, allow_nan=False)
betas = st.floats(1e-3, 10.0, allow_nan=False)


def pair(pw: float, pl: float, rw: float, rl: float) -> PairLogps:
    return PairLogps(*(torch.tensor([x], dtype=torch.float64) for x in (pw, pl, rw, rl)))


@SETTINGS
@given(h=gap, h_star=target)
def test_principled_loss_is_bounded_below_by_its_value_at_the_target(
    h: float, h_star: float
) -> None:
    loss = principled_losses(
        torch.tensor([h, h_star], dtype=torch.float64), target="constant", target_margin=h_star
    )
    assert loss[1].item() == pytest.approx(-1 / math.e, abs=1e-12)
    assert loss[0].item() >= -1 / math.e - 1e-12


@SETTINGS
@given(h=gap, h_star=target)
def test_principled_gradient_bound_and_sign(h: float, h_star: float) -> None:
    grad = dloss_dh(
        "principled",
        torch.tensor([h], dtype=torch.float64),
        target="constant",
        target_margin=h_star,
    ).item()
    assert abs(grad) <= 1 / h_star * (1 + 1e-9)
    assert (grad <= 0) if h <= h_star else (grad >= 0)  # descent always moves h towards h*


@SETTINGS
@given(h=gap, h_star=target)
def test_principled_squared_is_nonnegative_and_zero_only_at_target(h: float, h_star: float) -> None:
    loss = principled_losses(
        torch.tensor([h], dtype=torch.float64),
        target="constant",
        target_margin=h_star,
        shape="squared",
    ).item()
    assert loss == pytest.approx((h - h_star) ** 2 / (2 * h_star), rel=1e-12, abs=1e-300)


@SETTINGS
@given(h1=gap, h2=gap, beta=betas)
def test_dpo_loss_is_positive_and_decreasing_in_h(h1: float, h2: float, beta: float) -> None:
    lo, hi = sorted((h1, h2))
    loss = compute_loss(
        "sigmoid", gap_batch(torch.tensor([lo, hi], dtype=torch.float64)), beta=beta
    ).losses
    assert loss[0] >= loss[1] >= 0
    if (
        beta * hi < 30
    ):  # beyond that −logσ(βh) ≈ e^{−βh} can underflow in its low bits but stays > 0 until ~700
        assert loss[1] > 0


@SETTINGS
@given(pw=logp, pl=logp, rw=logp, rl=logp, beta=betas)
def test_dpo_swap_symmetry(pw: float, pl: float, rw: float, rl: float, beta: float) -> None:
    forward = compute_loss("sigmoid", pair(pw, pl, rw, rl), beta=beta).losses.item()
    swapped = compute_loss("sigmoid", pair(pl, pw, rl, rw), beta=beta).losses.item()
    x = beta * ((pw - rw) - (pl - rl))
    assert swapped - forward == pytest.approx(x, rel=1e-9, abs=1e-9)


@SETTINGS
@given(pw=logp, pl=logp, rw=logp, rl=logp, eps=st.floats(0.0, 0.45), beta=betas)
def test_robust_dpo_is_unbiased_under_label_flips(
    pw: float, pl: float, rw: float, rl: float, eps: float, beta: float
) -> None:
    # (1−ε)·ℓ(y_w ≻ y_l) + ε·ℓ(y_l ≻ y_w) = DPO loss on the clean label
    clean = compute_loss(
        "robust", pair(pw, pl, rw, rl), beta=beta, label_smoothing=eps
    ).losses.item()
    flipped = compute_loss(
        "robust", pair(pl, pw, rl, rw), beta=beta, label_smoothing=eps
    ).losses.item()
    dpo = compute_loss("sigmoid", pair(pw, pl, rw, rl), beta=beta).losses.item()
    assert (1 - eps) * clean + eps * flipped == pytest.approx(
        dpo, rel=1e-7, abs=1e-9 * (1 + abs(clean))
    )


@SETTINGS
@given(h=gap, eps=st.floats(1e-4, 0.5), beta=betas)
def test_exo_pair_is_a_kl_divergence(h: float, eps: float, beta: float) -> None:
    loss = compute_loss(
        "exo_pair",
        gap_batch(torch.tensor([h], dtype=torch.float64)),
        beta=beta,
        label_smoothing=eps,
    ).losses.item()
    assert loss >= -1e-12


@SETTINGS
@given(a=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=8), seed=st.integers(0, 2**16))
def test_aot_unpaired_mean_ignores_how_the_sides_are_matched(a: list[float], seed: int) -> None:
    chosen = torch.tensor(a, dtype=torch.float64)
    rejected = chosen.flip(0) - 3.0
    zero = torch.zeros_like(chosen)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    one = compute_loss("aot_unpaired", PairLogps(chosen, rejected, zero, zero)).mean()
    other = compute_loss("aot_unpaired", PairLogps(chosen, rejected[perm], zero, zero)).mean()
    torch.testing.assert_close(one, other)


@settings(deadline=None, max_examples=150, derandomize=True)
@given(
    name=st.sampled_from(sorted(LOSSES)),
    values=st.lists(logp, min_size=16, max_size=16),
    bf16=st.booleans(),
)
def test_every_loss_is_finite_for_log_probs_in_range(
    name: str, values: list[float], bf16: bool
) -> None:
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.tensor(values, dtype=dtype).reshape(4, 4)
    batch = extreme_batch(dtype)
    n = CORNERS.shape[1]
    batch.policy_chosen, batch.policy_rejected, batch.ref_chosen, batch.ref_rejected = (
        x[i].repeat(n // 4).requires_grad_(i < 2) for i in range(4)
    )
    out = compute_loss(name, batch)
    assert torch.isfinite(out.losses).all()
    assert_finite_grads(out.mean(), batch)
