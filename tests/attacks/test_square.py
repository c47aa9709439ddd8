"""The Square Attack: threat model, reproducibility, monotonicity in queries, the update's geometry,
and agreement with the authors' AutoAttack implementation on trained ensembles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.attacks.core import Norm, attack_mode, l2_norms
from phalanx.attacks.square import centered_squares, l2_window, p_schedule, square, square_side


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small_net(channels: int, classes: int = 4) -> nn.Module:
    """An untrained net with BatchNorm and Dropout (so its train/eval mode matters), any image size."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(96, classes))


def _predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with attack_mode(model), torch.no_grad():
        return model(x).argmax(1)


def _robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with attack_mode(model), torch.no_grad():
        return model(x_adv).argmax(1) == y


def _dist(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    return delta.flatten(1).abs().amax(1) if norm is Norm.LINF else l2_norms(delta)


@pytest.fixture(scope="module")
def digit_member(digits_ensemble):
    """A trained member of the digits ensemble and 100 of its 1x16x16 test images."""
    mixture, x, y = digits_ensemble
    return mixture.members[0], x[:100], y[:100]


# --- the threat model, on any image shape ----------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 1, 16, 16), (4, 3, 32, 32), (3, 3, 12, 20), (3, 1, 4, 4)])
@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.1), (Norm.L2, 1.0)])
def test_shape_ball_and_pixel_range(shape, norm, eps):
    model = _small_net(shape[1])
    x = torch.rand(shape, generator=_gen(1))
    y = _predicted(model, x)  # all correctly classified: every example is attacked
    x_copy = x.clone()
    x_adv = square(model, x, y, eps=eps, norm=norm.value, queries=30, generator=_gen())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.equal(x, x_copy)
    assert float(_dist(x_adv - x, norm).max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_empty_batch_and_zero_eps_return_the_input():
    model = _small_net(1)
    x = torch.rand(5, 1, 8, 8, generator=_gen(1))
    empty = square(model, x[:0], torch.zeros(0, dtype=torch.long), eps=0.1)
    assert empty.shape == (0, 1, 8, 8)
    assert torch.equal(square(model, x, _predicted(model, x), eps=0.0, queries=5), x)


def test_misclassified_examples_are_returned_unchanged():
    model = _small_net(1)
    x = torch.rand(8, 1, 8, 8, generator=_gen(1))
    wrong = (_predicted(model, x) + 1) % 4
    assert torch.equal(square(model, x, wrong, eps=0.3, queries=20, generator=_gen()), x)


# --- the update rule's geometry ----------------------------------------------------------------

def test_linf_points_lie_on_the_vertices_of_the_ball():
    """Stripes of +-eps and windows moved by +-2 eps then clipped: away from the [0, 1] edges every
    pixel of the returned point is exactly x +- eps (paper Algorithm 2)."""
    model, eps = _small_net(3), 0.05
    x = 0.2 + 0.6 * torch.rand(5, 3, 16, 16, generator=_gen(1))  # in [eps, 1 - eps]: no clamping
    x_adv = square(model, x, _predicted(model, x), eps=eps, queries=40, generator=_gen())
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, eps), atol=1e-6)


def test_l2_points_lie_on_the_sphere_when_nothing_is_clamped():
    """Every L2 candidate is rescaled onto the eps sphere (paper Algorithm 3); with pixels far from 0
    and 1 nothing is clamped, so the returned point has norm exactly eps."""
    model, eps = _small_net(3), 0.3
    x = torch.full((5, 3, 16, 16), 0.5)
    x = x + 0.01 * torch.randn(x.shape, generator=_gen(1))
    x_adv = square(model, x, _predicted(model, x), eps=eps, norm="l2", queries=40, generator=_gen())
    assert float((x_adv - x).abs().max()) < 0.45  # nothing reached 0 or 1
    assert torch.allclose(l2_norms(x_adv - x), torch.full((5,), eps), rtol=1e-5)


def test_l2_window_by_hand():
    """eta for side 3: the top row (one centred square row) is proportional to (1/4, 1 + 1/4, 1/4),
    the bottom two rows negative, each half of norm 1/sqrt(2), the whole of norm 1."""
    like = torch.zeros(1, dtype=torch.float64)
    row = centered_squares(1, 3, like=like)[0]
    assert torch.allclose(row / row[0], torch.tensor([1.0, 5.0, 1.0], dtype=torch.float64))
    block = centered_squares(3, 3, like=like)
    expected = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float64)
    assert torch.allclose(block / block[0, 0], expected)
    eta = l2_window(3, like=like)
    assert bool((eta[0] > 0).all()) and bool((eta[1:] < 0).all())
    assert math.isclose(float(eta[:1].norm()), 2 ** -0.5) and math.isclose(float(eta[1:].norm()), 2 ** -0.5)


def test_p_schedule_and_square_side_by_hand():
    assert [p_schedule(it, p_init=0.8, queries=5000) for it in (0, 10, 11, 50, 51, 4001, 8001)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 128, 0.8 / 512]
    # rescaled onto 1,000 queries: iteration 100 counts as iteration 1,000 of 10,000
    assert p_schedule(100, p_init=0.8, queries=1000, rescale=True) == 0.8 / 16
    assert square_side(0.8, 32, 32, norm=Norm.LINF) == 29  # round(sqrt(819.2))
    assert square_side(0.8 / 512, 32, 32, norm=Norm.LINF) == 1
    assert square_side(0.8 / 512, 32, 32, norm=Norm.L2) == 3  # at least 3
    assert square_side(0.8 / 64, 32, 32, norm=Norm.L2) == 5  # round(3.58) = 4, made odd
    assert square_side(0.8, 16, 8, norm=Norm.LINF) == 8  # at most the shorter side


# --- on a trained model ----------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_accuracy_drops_on_a_trained_model(digit_member, norm, eps):
    model, x, y = digit_member
    clean = float(_robust(model, x, y).float().mean())
    robust = float(_robust(model, square(model, x, y, eps=eps, norm=norm, queries=300, generator=_gen()),
                           y).float().mean())
    assert robust < clean - 0.3, f"{norm}: {clean:.2f} -> {robust:.2f}"


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_same_seed_same_result_and_more_queries_never_weaker(digit_member, norm, eps):
    """The run with 200 queries continues the run with 60 on the same seed: whatever 60 queries fooled
    stays fooled, at the same point, and no other example ends at a higher margin."""
    model, x, y = digit_member
    short = square(model, x, y, eps=eps, norm=norm, queries=60, generator=_gen(3))
    assert torch.equal(short, square(model, x, y, eps=eps, norm=norm, queries=60, generator=_gen(3)))
    assert not torch.equal(short, square(model, x, y, eps=eps, norm=norm, queries=60, generator=_gen(4)))
    long = square(model, x, y, eps=eps, norm=norm, queries=200, generator=_gen(3))
    fooled_short, fooled_long = ~_robust(model, short, y), ~_robust(model, long, y)
    assert bool((fooled_long | ~fooled_short).all()) and int(fooled_long.sum()) > int(fooled_short.sum())
    assert torch.equal(long[fooled_short], short[fooled_short])
    with torch.no_grad():
        def margin(x_adv):
            z = model(x_adv)
            return z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).amax(1)
        assert bool((margin(long) <= margin(short) + 1e-6)[~fooled_short].all())


def test_restarts_never_hurt(digit_member):
    model, x, y = digit_member
    one = _robust(model, square(model, x, y, eps=0.08, queries=40, generator=_gen()), y)
    three = _robust(model, square(model, x, y, eps=0.08, queries=40, restarts=3, generator=_gen()), y)
    assert bool((one | ~three).all()) and int(three.sum()) < int(one.sum())


def test_model_mode_and_grads_are_left_as_found():
    model = _small_net(1).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[1].eval()
    modes = [m.training for m in model.modules()]
    x = torch.rand(4, 1, 8, 8, generator=_gen(1))
    square(model, x, torch.zeros(4, dtype=torch.long), eps=0.1, queries=10, generator=_gen())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")


@pytest.mark.parametrize("kwargs,x_shape,match", [
    ({"eps": -0.1}, (2, 1, 8, 8), r"eps must be a finite number >= 0, got -0.1"),
    ({"eps": float("nan")}, (2, 1, 8, 8), r"eps must be a finite number >= 0, got nan"),
    ({"eps": 0.1, "norm": "l1"}, (2, 1, 8, 8), r"unknown norm 'l1'; allowed: \['linf', 'l2'\]"),
    ({"eps": 0.1, "queries": 0}, (2, 1, 8, 8), r"queries must be an integer >= 1, got 0"),
    ({"eps": 0.1, "queries": 10.0}, (2, 1, 8, 8), r"queries must be an integer >= 1, got 10.0"),
    ({"eps": 0.1, "restarts": 0}, (2, 1, 8, 8), r"restarts must be an integer >= 1, got 0"),
    ({"eps": 0.1, "p_init": 0.0}, (2, 1, 8, 8), r"p_init must be a number in \(0, 1\], got 0.0"),
    ({"eps": 0.1, "p_init": 1.5}, (2, 1, 8, 8), r"p_init must be a number in \(0, 1\], got 1.5"),
    ({"eps": 0.1}, (2, 64), r"square needs images x of shape \(batch, channels, height, width\), "
                             r"got \(2, 64\)"),
])
def test_bad_arguments_raise_with_a_message(kwargs, x_shape, match):
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=match):
        square(model, torch.rand(x_shape), torch.zeros(2, dtype=torch.long), **kwargs)


def test_pixels_outside_the_unit_range_are_refused():
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\], got values in \[0, 2\]"):
        square(_small_net(1), torch.tensor([0.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8).contiguous(),
               torch.zeros(2, dtype=torch.long), eps=0.1)


# --- agreement with the authors' implementation (AutoAttack's square.py) ---------------------------
#
# Random search is noisy, and square.py's runs are noisier than ours: it draws one window (and, for
# Linf, one sign per channel) for the whole batch per query, so its examples succeed or fail together.
# Measured on digits member 1 (500 queries, the 1,000 images below, seeds 0-4): robust accuracy
# Linf ours 62.1-63.0% (sd 0.4 points), square.py 60.9-62.7% (sd 0.7); L2 ours 56.2-56.6% (sd 0.2),
# square.py 55.5-57.5% (sd 0.8). The difference of one run of each has sd ~0.8 points, hence 2 points
# (~2.5 sd) here. On 200 images at 5,000 queries one run's sd is 0.5-1.2 points, too much for a
# 1-point bound per model: the slow table bounds each model at 3 points and their mean at 1 point.

def _reference_square(reference_autoattack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                      norm: str, queries: int, seed: int) -> torch.Tensor:
    """square.py as AutoAttack's `standard` suite builds it (autoattack.py), on `queries` queries."""
    from autoattack.square import SquareAttack
    attack = SquareAttack(model, p_init=0.8, n_queries=queries, eps=eps,
                          norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, seed=seed, device="cpu",
                          verbose=False, resc_schedule=False)
    with attack_mode(model), torch.no_grad(), torch.random.fork_rng():  # it reseeds torch's global generator
        return attack.perturb(x, y)


def _accuracy_pair(reference_autoattack, model, x, y, *, eps, norm, queries) -> tuple[float, float]:
    ours = square(model, x, y, eps=eps, norm=norm, queries=queries, generator=_gen(0))
    theirs = _reference_square(reference_autoattack, model, x, y, eps=eps, norm=norm, queries=queries, seed=0)
    for x_adv in (ours, theirs):
        assert float(_dist(x_adv - x, Norm(norm)).max()) <= eps + 1e-5
    return float(_robust(model, ours, y).float().mean()), float(_robust(model, theirs, y).float().mean())


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_agrees_with_the_reference_on_1000_digits(reference_autoattack, digits_ensemble, norm, eps):
    """One digits member, 500 queries, the 360 test digits and the first 640 training digits."""
    from phalanx.data import load_dataset
    model = digits_ensemble[0].members[0]
    (x_test, y_test), (x_train, y_train) = load_dataset("digits", "test"), load_dataset("digits", "train")
    x, y = torch.cat([x_test, x_train])[:1000].float() / 255, torch.cat([y_test, y_train])[:1000]
    ours, theirs = _accuracy_pair(reference_autoattack, model, x, y, eps=eps, norm=norm, queries=500)
    clean = float(_robust(model, x, y).float().mean())
    assert ours < clean - 0.2
    assert abs(ours - theirs) <= 0.02, f"{norm} eps {eps}, n=1000: ours {ours:.3f}, square.py {theirs:.3f}"


@pytest.mark.slow
def test_agrees_with_the_reference_at_5000_queries(reference_autoattack, digits_ensemble, cifar_ensemble):
    """AutoAttack's setting (5,000 queries) on every member and the mixture, 200 images each."""
    from phalanx.eval.whitebox import named_models
    settings = [(digits_ensemble, "digits", [("linf", 0.1), ("l2", 1.0)]),
                (cifar_ensemble, "cifar10", [("linf", 8 / 255), ("l2", 0.5)])]
    rows = []
    for (mixture, x, y), data, budgets in settings:
        for name, model in named_models(mixture):
            for norm, eps in budgets:
                ours, theirs = _accuracy_pair(reference_autoattack, model, x, y, eps=eps, norm=norm,
                                              queries=5000)
                rows.append((f"{data} {name} {norm} eps {eps:.4g} n={len(y)}", ours, theirs))
    table = "\n".join(f"{what}: ours {a:.3f}, square.py {b:.3f}" for what, a, b in rows)
    print(table)
    assert all(abs(a - b) <= 0.03 for _, a, b in rows), table
    assert abs(sum(a - b for _, a, b in rows) / len(rows)) <= 0.01, table
