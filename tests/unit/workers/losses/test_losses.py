"""Loss library: values against scalar float64 references, reductions, metrics, masking and errors.

The expected numbers are computed here with `math` on python floats, independently of the library.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from workers.losses import (
    LOSSES,
    PairLogps,
    compute_loss,
    loss_params,
    resolve_params,
)

# --------------------------------------------------------------------------------------------------
# Fixed inputs (three pairs) and scalar references
# --------------------------------------------------------------------------------------------------

PW = [-10.0, -20.0, -5.0]
PL = [-12.0, -15.0, -30.0]
RW = [-11.0, -19.0, -6.5]
RL = [-11.5, -16.0, -25.0]
LW = [5.0, 8.0, 3.0]
LL = [6.0, 4.0, 10.0]
# prefix = first min(|y_w|, |y_l|) tokens; the shorter response's prefix is the whole response
PW_PREFIX, PL_PREFIX = [-10.0, -11.0, -5.0], [-10.0, -15.0, -9.0]
RW_PREFIX, RL_PREFIX = [-11.0, -10.0, -6.5], [-9.5, -16.0, -8.0]
SW, SL = [2.0, 1.5, 3.0], [1.0, 0.2, 2.99]
PREF = [0.8, 0.6, 0.95]
WIN_W, WIN_L = [0.7, 0.4, 0.9], [0.2, 0.55, 0.1]
LOGW_W, LOGW_L = [-0.1, -0.3, 0.05], [-0.2, 0.0, -0.4]
KL_POLICY, KL_REF = [-9.0, -14.0, -20.0, -7.0], [-10.0, -13.0, -22.0, -7.5]

A = [p - r for p, r in zip(PW, RW)]  # [1.0, -1.0, 1.5]
B = [p - r for p, r in zip(PL, RL)]  # [-0.5, 1.0, -5.0]
H = [a - b for a, b in zip(A, B)]  # [1.5, -2.0, 6.5]


def t(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def full_batch(dtype: torch.dtype = torch.float64, **overrides: object) -> PairLogps:
    fields = {
        "policy_chosen": t(PW, dtype),
        "policy_rejected": t(PL, dtype),
        "ref_chosen": t(RW, dtype),
        "ref_rejected": t(RL, dtype),
        "chosen_len": t(LW, dtype),
        "rejected_len": t(LL, dtype),
        "chosen_score": t(SW, dtype),
        "rejected_score": t(SL, dtype),
        "preference_prob": t(PREF, dtype),
        "chosen_wpo_logw": t(LOGW_W, dtype),
        "rejected_wpo_logw": t(LOGW_L, dtype),
        "policy_chosen_prefix": t(PW_PREFIX, dtype),
        "policy_rejected_prefix": t(PL_PREFIX, dtype),
        "ref_chosen_prefix": t(RW_PREFIX, dtype),
        "ref_rejected_prefix": t(RL_PREFIX, dtype),
        "chosen_winrate": t(WIN_W, dtype),
        "rejected_winrate": t(WIN_L, dtype),
        "kl_policy": t(KL_POLICY, dtype),
        "kl_ref": t(KL_REF, dtype),
    }
    fields.update(overrides)
    return PairLogps(**fields)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(x: float, eps: float) -> float:
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def pairs() -> range:
    return range(len(PW))


NLL = -sum(PW) / sum(LW)


def ref_principled(beta: float, h_star_raw: list[float], min_target: float = 0.5) -> list[float]:
    out = []
    for h, raw in zip(H, h_star_raw):
        z = h / max(raw, min_target)
        out.append(-z * math.exp(-z) if z >= 0 else -z)
    return out


def ref_fdpo(beta: float, g) -> list[float]:
    return [-logsig(beta * (g(A[i]) - g(B[i]))) for i in pairs()]


def ref_orpo(beta: float) -> list[float]:
    out = []
    for i in pairs():
        mw, ml = PW[i] / LW[i], PL[i] / LL[i]
        log_odds = (mw - ml) - (math.log(1 - math.exp(mw)) - math.log(1 - math.exp(ml)))
        out.append(NLL - beta * logsig(log_odds))
    return out


def ref_ld(alpha: float) -> list[float]:
    def ld(total: float, prefix: float) -> float:
        return prefix + alpha * (total - prefix)

    out = []
    for i in pairs():
        a = ld(PW[i], PW_PREFIX[i]) - ld(RW[i], RW_PREFIX[i])
        b = ld(PL[i], PL_PREFIX[i]) - ld(RL[i], RL_PREFIX[i])
        out.append(-logsig(0.1 * (a - b)))
    return out


def ref_kto(beta: float, wd: float, wu: float) -> list[float]:
    z0 = max(0.0, sum(p - r for p, r in zip(KL_POLICY, KL_REF)) / len(KL_POLICY))
    return [
        0.5 * (wd * (1 - sig(beta * (A[i] - z0))) + wu * (1 - sig(beta * (z0 - B[i]))))
        for i in pairs()
    ]


def ref_bco(beta: float, delta: float | None) -> list[float]:
    if delta is None:
        delta = sum(beta * x for x in A + B) / (2 * len(A))
    return [0.5 * (-logsig(beta * A[i] - delta) - logsig(-(beta * B[i] - delta))) for i in pairs()]


CASES = [
    ("sigmoid", {}, [-logsig(0.1 * h) for h in H]),
    ("sigmoid", {"beta": 0.5}, [-logsig(0.5 * h) for h in H]),
    ("hinge", {"beta": 0.5}, [max(0.0, 1 - 0.5 * h) for h in H]),
    ("ipo", {"beta": 0.5}, [(A[i] / LW[i] - B[i] / LL[i] - 1.0) ** 2 for i in pairs()]),
    (
        "exo_pair",
        {"beta": 0.5, "label_smoothing": 0.01},
        [
            sig(0.5 * h) * (logsig(0.5 * h) - math.log(0.99))
            + sig(-0.5 * h) * (logsig(-0.5 * h) - math.log(0.01))
            for h in H
        ],
    ),
    (
        "nca_pair",
        {"beta": 0.5},
        [
            -logsig(0.5 * A[i]) - 0.5 * logsig(-0.5 * A[i]) - 0.5 * logsig(-0.5 * B[i])
            for i in pairs()
        ],
    ),
    (
        "robust",
        {"beta": 0.5, "label_smoothing": 0.2},
        [(-(0.8) * logsig(0.5 * h) + 0.2 * logsig(-0.5 * h)) / 0.6 for h in H],
    ),
    ("bco_pair", {"beta": 0.5}, [-logsig(0.5 * A[i]) - logsig(-0.5 * B[i]) for i in pairs()]),
    ("sppo_hard", {"beta": 0.5}, [(A[i] - 1.0) ** 2 + (B[i] + 1.0) ** 2 for i in pairs()]),
    (
        "aot",
        {"beta": 0.5, "label_smoothing": 0.1},
        [
            smoothed(0.5 * (x - y), 0.1)
            for x, y in zip(
                sorted(p - q for p, q in zip(PW, PL)), sorted(p - q for p, q in zip(RW, RL))
            )
        ],
    ),
    ("aot_unpaired", {"beta": 0.5}, [-logsig(0.5 * (x - y)) for x, y in zip(sorted(A), sorted(B))]),
    ("apo_zero", {"beta": 0.5}, [1 - sig(0.5 * A[i]) + sig(0.5 * B[i]) for i in pairs()]),
    ("apo_down", {"beta": 0.5}, [sig(0.5 * A[i]) + 1 - sig(0.5 * H[i]) for i in pairs()]),
    (
        "discopop",
        {"beta": 0.5, "discopop_tau": 0.3},
        [
            (1 - sig(0.5 * h / 0.3)) * -logsig(0.5 * h) + sig(0.5 * h / 0.3) * math.exp(-0.5 * h)
            for h in H
        ],
    ),
    ("sft", {}, [NLL] * 3),
    (
        "sigmoid_norm",
        {"beta": 0.5},
        [-logsig(0.5 * (A[i] / LW[i] - B[i] / LL[i])) for i in pairs()],
    ),
    # principled: auto with scores -> h* = (s_w - s_l)/beta = [10, 13, 0.1 -> min_target 0.5]
    ("principled", {}, ref_principled(0.1, [(SW[i] - SL[i]) / 0.1 for i in pairs()])),
    (
        "principled",
        {"target": "bradley_terry", "beta": 0.2},
        ref_principled(0.2, [math.log(p / (1 - p)) / 0.2 for p in PREF]),
    ),
    ("principled", {"target": "constant", "target_margin": 3.0}, ref_principled(0.1, [3.0] * 3)),
    (
        "principled",
        {"target": "constant", "target_margin": 3.0, "shape": "squared"},
        [(h - 3.0) ** 2 / 6.0 for h in H],
    ),
    (
        "principled",
        {"target": "constant", "target_margin": 3.0, "alpha": 0.5, "beta": 0.2},
        [
            x + 0.5 * math.log1p(math.exp(0.2 * B[i]))
            for i, x in enumerate(ref_principled(0.2, [3.0] * 3))
        ],
    ),
    ("simpo", {}, [-logsig(2.0 * PW[i] / LW[i] - 2.0 * PL[i] / LL[i] - 1.0) for i in pairs()]),
    (
        "simpo",
        {"beta": 2.5, "gamma": 0.3},
        [-logsig(2.5 * PW[i] / LW[i] - 2.5 * PL[i] / LL[i] - 0.3) for i in pairs()],
    ),
    (
        "cpo",
        {"beta": 0.5, "label_smoothing": 0.1, "cpo_alpha": 0.7},
        [smoothed(0.5 * (PW[i] - PL[i]), 0.1) + 0.7 * NLL for i in pairs()],
    ),
    ("orpo", {"beta": 0.5}, ref_orpo(0.5)),
    (
        "rpo",
        {"beta": 0.5, "alpha": 0.3},
        [-logsig(0.5 * H[i]) + 0.3 * -PW[i] / LW[i] for i in pairs()],
    ),
    ("fdpo", {"beta": 0.5}, ref_fdpo(0.5, lambda r: r)),
    ("fdpo", {"beta": 0.5, "divergence": "forward_kl"}, ref_fdpo(0.5, lambda r: -math.exp(-r))),
    ("fdpo", {"beta": 0.5, "divergence": "js_divergence"}, ref_fdpo(0.5, logsig)),
    (
        "fdpo",
        {"beta": 0.5, "divergence": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        ref_fdpo(0.5, lambda r: math.exp(-0.7 * r) / -0.7),
    ),
    (
        "dpop",
        {"beta": 0.5, "dpop_lambda": 5.0},
        [-logsig(0.5 * (H[i] - 5.0 * max(0.0, RW[i] - PW[i]))) for i in pairs()],
    ),
    ("npo", {"beta": 0.5}, [-(2 / 0.5) * logsig(-0.5 * b) for b in B]),
    ("wpo", {}, [math.exp(LOGW_W[i] + LOGW_L[i]) * -logsig(0.1 * H[i]) for i in pairs()]),
    ("ld_dpo", {}, ref_ld(0.5)),
    ("ld_dpo", {"ld_alpha": 0.2}, ref_ld(0.2)),
    (
        "sppo",
        {"beta": 0.5},
        [
            (A[i] - (WIN_W[i] - 0.5) / 0.5) ** 2 + (B[i] - (WIN_L[i] - 0.5) / 0.5) ** 2
            for i in pairs()
        ],
    ),
    ("kto", {}, ref_kto(0.1, 1.0, 1.0)),
    (
        "kto",
        {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.7},
        ref_kto(0.5, 1.3, 0.7),
    ),
    ("bco", {"beta": 0.5}, ref_bco(0.5, None)),
]


@pytest.mark.parametrize(
    ("name", "params", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_loss_values_match_float64_reference(
    name: str, params: dict, expected: list[float]
) -> None:
    out = compute_loss(name, full_batch(), **params)
    assert out.losses.dtype == torch.float64
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_every_registered_loss_has_a_value_case() -> None:
    assert {c[0] for c in CASES} == set(LOSSES)


def test_hand_worked_values() -> None:
    # h = 0: DPO loss is log 2; h = 1.5, beta = 0.5: hinge = 1 - 0.75
    zero = full_batch(policy_chosen=t(RW), policy_rejected=t(RL))
    assert compute_loss("sigmoid", zero).losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert compute_loss("hinge", full_batch(), beta=0.5).losses[0].item() == pytest.approx(0.25)
    # ipo pair 0: a/|y_w| - b/|y_l| = 1/5 + 0.5/6 = 0.28333..., target 1/(2*0.5) = 1
    assert compute_loss("ipo", full_batch(), beta=0.5).losses[0].item() == pytest.approx(
        (0.2 + 0.5 / 6 - 1) ** 2
    )
    # principled at h = h*: -1/e; constant target 1.5 = h of pair 0
    out = compute_loss("principled", full_batch(), target="constant", target_margin=1.5)
    assert out.losses[0].item() == pytest.approx(-1 / math.e)
    # kto: z0 = max(0, mean([1, -1, 2, 0.5])) = 0.625
    assert compute_loss("kto", full_batch()).metrics["kto/kl"] == pytest.approx(0.625)


def test_bco_uses_given_delta_and_reports_batch_mean() -> None:
    out = compute_loss("bco", full_batch(bco_delta=0.3), beta=0.5)
    assert out.losses.tolist() == pytest.approx(ref_bco(0.5, 0.3), rel=1e-10)
    assert out.metrics["bco/delta"] == pytest.approx(0.3)
    assert out.metrics["bco/batch_reward_mean"] == pytest.approx(sum(0.5 * x for x in A + B) / 6)
    tensor_delta = compute_loss("bco", full_batch(bco_delta=torch.tensor(0.3)), beta=0.5)
    assert torch.allclose(tensor_delta.losses, out.losses)


# --------------------------------------------------------------------------------------------------
# Reductions and symmetries
# --------------------------------------------------------------------------------------------------


def losses(name: str, batch: PairLogps | None = None, **params: object) -> torch.Tensor:
    return compute_loss(name, batch if batch is not None else full_batch(), **params).losses


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("robust", {"label_smoothing": 0.0}),
        ("ld_dpo", {"ld_alpha": 1.0}),
        ("fdpo", {"divergence": "reverse_kl"}),
        ("fdpo", {"divergence": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
        ("wpo", {}),  # with zero log-weights, see batch below
        ("rpo", {"alpha": 0.0}),
        ("dpop", {"dpop_lambda": 0.0}),
        ("aot", {}),  # with a single pair
        ("aot_unpaired", {}),
    ],
)
def test_reduces_to_sigmoid(name: str, params: dict) -> None:
    batch = full_batch(chosen_wpo_logw=t([0.0] * 3), rejected_wpo_logw=t([0.0] * 3))
    if name.startswith("aot"):
        batch = PairLogps(*(t([v[0]]) for v in (PW, PL, RW, RL)))
    torch.testing.assert_close(
        losses(name, batch, beta=0.3, **params), losses("sigmoid", batch, beta=0.3)
    )


def test_ld_dpo_is_sigmoid_when_both_responses_are_all_prefix() -> None:
    batch = full_batch(
        policy_chosen_prefix=t(PW),
        policy_rejected_prefix=t(PL),
        ref_chosen_prefix=t(RW),
        ref_rejected_prefix=t(RL),
    )
    torch.testing.assert_close(losses("ld_dpo", batch, ld_alpha=0.0), losses("sigmoid", batch))


def test_forward_kl_is_alpha_divergence_at_zero() -> None:
    torch.testing.assert_close(
        losses("fdpo", divergence="forward_kl"),
        losses("fdpo", divergence="alpha_divergence", f_alpha_divergence_coef=0.0),
    )


def test_sigmoid_norm_with_unit_lengths_is_sigmoid() -> None:
    batch = full_batch(
        chosen_len=torch.ones(3, dtype=torch.float64),
        rejected_len=torch.ones(3, dtype=torch.float64),
    )
    torch.testing.assert_close(losses("sigmoid_norm", batch), losses("sigmoid", batch))


def test_cpo_and_simpo_are_dpo_against_a_uniform_reference() -> None:
    zero_ref = full_batch(
        ref_chosen=torch.zeros(3, dtype=torch.float64), ref_rejected=torch.zeros(3)
    )
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(losses("cpo", cpo_alpha=0.0), losses("sigmoid", zero_ref))
    unit = dataclasses.replace(zero_ref, chosen_len=ones, rejected_len=ones)
    torch.testing.assert_close(losses("simpo", unit, beta=0.1, gamma=0.0), losses("sigmoid", unit))


def test_reference_free_losses_ignore_missing_reference() -> None:
    no_ref = full_batch(ref_chosen=None, ref_rejected=None)
    for name in ("simpo", "cpo", "orpo", "sft"):
        torch.testing.assert_close(losses(name, no_ref), losses(name))


def test_sppo_with_hard_win_rates_is_sppo_hard() -> None:
    hard = full_batch(
        chosen_winrate=torch.ones(3, dtype=torch.float64), rejected_winrate=torch.zeros(3)
    )
    torch.testing.assert_close(losses("sppo", hard, beta=0.2), losses("sppo_hard", hard, beta=0.2))


def test_bco_with_zero_shift_is_half_bco_pair() -> None:
    torch.testing.assert_close(losses("bco", full_batch(bco_delta=0.0)), 0.5 * losses("bco_pair"))


def test_discopop_switches_between_logistic_and_exponential() -> None:
    z = [0.3 * h for h in H]
    expected = [-logsig(x) if x < 0 else math.exp(-x) for x in z]
    assert losses("discopop", beta=0.3, discopop_tau=1e-4).tolist() == pytest.approx(
        expected, rel=1e-9
    )


def test_swapping_chosen_and_rejected_in_dpo() -> None:
    swapped = full_batch(
        policy_chosen=t(PL), policy_rejected=t(PW), ref_chosen=t(RL), ref_rejected=t(RW)
    )
    assert losses("sigmoid", swapped, beta=0.5).tolist() == pytest.approx(
        [-logsig(-0.5 * h) for h in H]
    )
    # -logσ(-x) - (-logσ(x)) = x
    torch.testing.assert_close(
        losses("sigmoid", swapped, beta=0.5) - losses("sigmoid", beta=0.5), 0.5 * t(H)
    )


def test_exo_pair_is_zero_at_the_smoothed_label() -> None:
    eps = 0.05
    h = math.log((1 - eps) / eps) / 0.1  # σ(βh) = 1 - ε
    batch = PairLogps(t([h]), t([0.0]), t([0.0]), t([0.0]))
    assert losses("exo_pair", batch, label_smoothing=eps).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Metrics, dtypes, weights
# --------------------------------------------------------------------------------------------------


def test_trl_reward_metrics_from_raw_log_ratios() -> None:
    out = compute_loss("ipo", full_batch(), beta=0.5)
    m = out.metrics
    assert m["rewards/chosen"] == pytest.approx(sum(0.5 * a for a in A) / 3)
    assert m["rewards/rejected"] == pytest.approx(sum(0.5 * b for b in B) / 3)
    assert m["rewards/margins"] == pytest.approx(sum(0.5 * h for h in H) / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)  # pair 1 has a < b
    assert m["logps/chosen"] == pytest.approx(sum(PW) / 3)
    assert m["logps/rejected"] == pytest.approx(sum(PL) / 3)
    assert m["ranking/accuracy"] == pytest.approx(2 / 3)  # pw > pl for pairs 0 and 2
    # per token: -2 > -2, -2.5 > -3.75, -1.667 > -3  -> pair 0 is a tie, which counts as wrong
    assert m["ranking/accuracy_len_norm"] == pytest.approx(2 / 3)
    assert all(type(v) is float for v in m.values())
    assert not out.chosen_rewards.requires_grad
    torch.testing.assert_close(out.chosen_rewards, 0.5 * t(A))


def test_reward_accuracy_counts_ties_as_wrong() -> None:
    tie = PairLogps(t([-1.0, -1.0]), t([-1.0, -3.0]), t([0.0, 0.0]), t([0.0, 0.0]))
    assert compute_loss("sigmoid", tie).metrics["rewards/accuracies"] == 0.5


def test_reference_free_rewards() -> None:
    m = compute_loss("cpo", full_batch(), beta=0.5)
    torch.testing.assert_close(m.chosen_rewards, 0.5 * t(PW))
    s = compute_loss("simpo", full_batch(), beta=2.0)
    torch.testing.assert_close(s.rejected_rewards, 2.0 * t(PL) / t(LL))


def test_ld_dpo_rewards_use_weighted_log_ratios() -> None:
    out = compute_loss("ld_dpo", full_batch(), ld_alpha=1.0)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * t(A))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    low = full_batch(dtype)
    exact = PairLogps(
        **{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in vars(low).items()}
    )
    for name in LOSSES:
        out, ref = compute_loss(name, low), compute_loss(name, exact)
        assert out.losses.dtype == torch.float32 and out.weights.dtype == torch.float32, name
        torch.testing.assert_close(out.losses, ref.losses, msg=name)
        assert out.metrics == pytest.approx(ref.metrics), name


def test_gradients_flow_to_bf16_policy_logps() -> None:
    pw = t(PW, torch.bfloat16).requires_grad_()
    out = compute_loss("sigmoid", full_batch(torch.bfloat16, policy_chosen=pw))
    out.mean().backward()
    assert pw.grad is not None and pw.grad.dtype == torch.bfloat16 and torch.all(pw.grad < 0)


def test_mean_is_the_plain_mean_without_exclusions() -> None:
    out = compute_loss("sigmoid", full_batch())
    torch.testing.assert_close(out.weights, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out.mean(), out.losses.mean())


def test_principled_masks_and_counts_invalid_pairs() -> None:
    # pair 1: tied scores, pair 2: reversed scores -> excluded, never flipped
    pw = t(PW).requires_grad_()
    batch = full_batch(
        policy_chosen=pw, chosen_score=t([2.0, 1.5, 3.0]), rejected_score=t([1.0, 1.5, 3.5])
    )
    out = compute_loss("principled", batch)
    assert out.weights.tolist() == [1.0, 0.0, 0.0]
    assert out.losses[1:].tolist() == [0.0, 0.0]
    assert out.metrics["principled/invalid_pairs"] == 2.0
    assert out.metrics["principled/target_mean"] == pytest.approx(10.0)
    assert out.metrics["principled/gap_to_target"] == pytest.approx(abs(H[0] - 10.0))
    assert out.metrics["principled/frac_past_target"] == 0.0
    z = H[0] / 10.0
    assert out.mean().item() == pytest.approx(
        -z * math.exp(-z)
    )  # the mean counts only the valid pair
    out.mean().backward()
    assert pw.grad[1:].tolist() == [0.0, 0.0] and pw.grad[0] < 0


def test_principled_all_invalid_gives_zero_loss_and_finite_grad() -> None:
    pw = t(PW).requires_grad_()
    out = compute_loss(
        "principled",
        full_batch(policy_chosen=pw, preference_prob=t([0.5, 0.2, 1.0])),
        target="bradley_terry",
    )
    assert out.metrics["principled/invalid_pairs"] == 3.0
    assert out.mean().item() == 0.0
    out.mean().backward()
    assert torch.all(pw.grad == 0)


def test_principled_metrics_frac_past_target() -> None:
    out = compute_loss("principled", full_batch(), target="constant", target_margin=1.0)
    assert out.metrics["principled/frac_past_target"] == pytest.approx(2 / 3)
    assert out.metrics["principled/target_mean"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Parameters and errors
# --------------------------------------------------------------------------------------------------


def test_loss_params_lists_defaults() -> None:
    assert loss_params("principled") == {
        "beta": 0.1,
        "target": "auto",
        "reward_scale": 1.0,
        "target_prob": 0.75,
        "target_margin": 10.0,
        "alpha": 0.0,
        "negative_side": "linear",
        "min_target": 0.5,
        "shape": "natural",
    }
    assert loss_params("sigmoid") == {"beta": 0.1}
    assert loss_params("fdpo") == {
        "beta": 0.1,
        "divergence": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
    }
    assert loss_params("dpop")["dpop_lambda"] == 50.0
    assert loss_params("discopop")["discopop_tau"] == 0.05
    assert loss_params("cpo") == {"beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0}
    for name in LOSSES:
        assert "beta" in loss_params(name), name


def test_resolve_params_fills_defaults() -> None:
    assert resolve_params("robust", {"label_smoothing": 0.1}) == {
        "beta": 0.1,
        "label_smoothing": 0.1,
    }


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dpo'.*'principled'.*'sigmoid'"):
        compute_loss("dpo", full_batch())
    with pytest.raises(ValueError, match="valid losses"):
        loss_params("nope")


def test_unknown_parameter_lists_valid_parameters() -> None:
    with pytest.raises(
        ValueError, match=r"unknown parameter\(s\) \['betta'\].*valid parameters: \['beta'\]"
    ):
        compute_loss("sigmoid", full_batch(), betta=0.1)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("principled", {"target": "score"}, "target must be one of"),
        ("principled", {"shape": "cubic"}, "shape must be one of"),
        ("fdpo", {"divergence": "kl"}, "divergence must be one of"),
        ("sigmoid", {"beta": "0.1"}, "beta must be a number"),
        ("sigmoid", {"beta": True}, "beta must be a number"),
        ("sigmoid", {"beta": 0.0}, "beta must be > 0"),
        ("exo_pair", {"label_smoothing": 0.0}, "0 < label_smoothing < 1"),
        ("robust", {"label_smoothing": 0.5}, "0 <= label_smoothing < 0.5"),
        ("discopop", {"discopop_tau": 0.0}, "discopop_tau > 0"),
        ("principled", {"target": "bradley_terry", "target_prob": 0.5}, "target_prob"),
        ("principled", {"target": "constant", "target_margin": -1.0}, "target_margin > 0"),
        ("principled", {"min_target": 0.0}, "min_target > 0"),
    ],
)
def test_invalid_parameter_values(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_loss(name, full_batch(), **params)


@pytest.mark.parametrize(
    ("name", "params", "missing", "match"),
    [
        ("principled", {"target": "scores"}, ("chosen_score",), "chosen_score"),
        (
            "ld_dpo",
            {},
            ("policy_chosen_prefix", "ref_rejected_prefix"),
            "policy_chosen_prefix, ref_rejected_prefix",
        ),
        ("sigmoid", {}, ("ref_chosen",), "ref_chosen"),
        ("principled", {}, ("ref_rejected",), "ref_rejected"),
        ("wpo", {}, ("chosen_wpo_logw",), "chosen_wpo_logw"),
        ("sppo", {}, ("rejected_winrate",), "rejected_winrate"),
        ("kto", {}, ("kl_policy", "kl_ref"), "kl_policy, kl_ref"),
        ("ipo", {}, ("chosen_len",), "chosen_len"),
        ("simpo", {}, ("rejected_len",), "rejected_len"),
    ],
)
def test_missing_batch_fields(
    name: str, params: dict, missing: tuple[str, ...], match: str
) -> None:
    batch = full_batch(**dict.fromkeys(missing))
    with pytest.raises(ValueError, match=rf"loss '{name}': needs batch field\(s\) {match}"):
        compute_loss(name, batch, **params)


def test_principled_auto_falls_back_to_bradley_terry_without_scores() -> None:
    out = compute_loss(
        "principled", full_batch(chosen_score=None, rejected_score=None, preference_prob=None)
    )
    assert out.metrics["principled/target_mean"] == pytest.approx(math.log(3) / 0.1)


def test_batch_shape_errors() -> None:
    with pytest.raises(ValueError, match="ref_chosen must be a tensor of shape"):
        compute_loss("sigmoid", full_batch(ref_chosen=t([0.0, 1.0])))
    with pytest.raises(ValueError, match="policy_chosen must be a 1-D tensor"):
        compute_loss("sigmoid", full_batch(policy_chosen=torch.zeros(3, 1)))
    with pytest.raises(ValueError, match="kl_policy and kl_ref"):
        compute_loss("kto", full_batch(kl_ref=None))
