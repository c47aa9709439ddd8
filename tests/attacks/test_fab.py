"""FAB-T: the hyperplane-and-box projections against brute force, the attack on hand-checkable linear
models, its threat model and manners, and its robust accuracy against the authors' FAB-T."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from phalanx.attacks.core import Norm, attack_mode
from phalanx.attacks.core import norms
from phalanx.attacks.fab import fab_step, fab_t, project_hyperplane_box, random_start


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    return norms(x_adv - x, norm)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


# --- the projection onto {hyperplane} ∩ {box} -------------------------------------------------------

def tiny_cases(seed: int, rows: int = 300, dims: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points, hyperplanes (w, b) in `dims` <= 4 dimensions: some points on the box's faces, some w_i = 0,
    some hyperplanes through the point, most crossing the box, some missing it."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(rows, dims, generator=g, dtype=torch.float64)
    faces = torch.rand(rows, dims, generator=g) < 0.15
    p = torch.where(faces, (torch.rand(rows, dims, generator=g) < 0.5).double(), p)
    w = torch.randn(rows, dims, generator=g, dtype=torch.float64)
    w = torch.where(torch.rand(rows, dims, generator=g) < 0.2, torch.zeros_like(w), w)
    kind = torch.randint(0, 10, (rows,), generator=g)
    q = torch.rand(rows, dims, generator=g, dtype=torch.float64)
    b = (w * q).sum(1)  # through a point of the box
    b = torch.where(kind == 0, (w * p).sum(1), b)  # through the point itself
    b = torch.where(kind == 1, w.clamp(min=0).sum(1) + 0.3, b)  # above the box
    b = torch.where(kind == 2, w.clamp(max=0).sum(1) - 0.3, b)  # below the box
    return p, w, b


def brute_force_l2(p: torch.Tensor, w: torch.Tensor, b: float) -> float | None:
    """The smallest L2 step onto {<w, z> = b} ∩ [0, 1]^d by trying every active set (each coordinate at
    its lower face, its upper face, or free with d_i = mu w_i, as the KKT conditions require); None
    when the hyperplane misses the box."""
    best = None
    for state in itertools.product((0, 1, 2), repeat=len(p)):
        faces = [-float(p[i]) if s == 0 else 1 - float(p[i]) if s == 1 else 0.0 for i, s in enumerate(state)]
        fixed = torch.tensor(faces, dtype=torch.float64)
        free = torch.tensor([s == 2 for s in state])
        rest = b - float((w * p).sum()) - float((w * fixed)[~free].sum())
        curvature = float((w[free] ** 2).sum())
        if curvature == 0:
            if abs(rest) > 1e-12:
                continue
            mu = 0.0
        else:
            mu = rest / curvature
        d = torch.where(free, mu * w, fixed)
        if bool(((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()):
            size = float(d.norm())
            best = size if best is None else min(best, size)
    return best


def brute_force_linf(p: torch.Tensor, w: torch.Tensor, b: float) -> float | None:
    """The smallest Linf step onto {<w, z> = b} ∩ [0, 1]^d as a linear program over (d, lam):
    minimise lam subject to |d_i| <= lam, 0 <= p + d <= 1, <w, d> = b - <w, p>; None if infeasible."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    n = len(p)
    cost = [0.0] * n + [1.0]
    a_ub = [[(1.0 if j == i else 0.0) for j in range(n)] + [-1.0] for i in range(n)]
    a_ub += [[(-1.0 if j == i else 0.0) for j in range(n)] + [-1.0] for i in range(n)]
    bounds = [(-float(p[i]), 1 - float(p[i])) for i in range(n)] + [(0, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=[0.0] * (2 * n), A_eq=[w.tolist() + [0.0]],
                  b_eq=[b - float((w * p).sum())], bounds=bounds, method="highs")
    return float(res.x[-1]) if res.status == 0 else None


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
@pytest.mark.parametrize("dims", [1, 2, 4])
def test_projection_is_the_smallest_step_onto_hyperplane_and_box(norm: Norm, dims: int) -> None:
    p, w, b = tiny_cases(seed=dims, rows=150 if dims == 4 else 300, dims=dims)
    d = project_hyperplane_box(p, w, b, norm=norm)
    z = p + d
    assert bool((z >= -1e-12).all() and (z <= 1 + 1e-12).all())
    assert bool((d[w == 0] == 0).all())  # coordinates the hyperplane ignores stay put
    brute = brute_force_linf if norm is Norm.LINF else brute_force_l2
    sizes = norms(d, norm)
    infeasible = 0
    for i in range(len(p)):
        best = brute(p[i], w[i], float(b[i]))
        if best is None:  # the nearest corner of the box along w
            infeasible += 1
            upward = bool(b[i] > (w[i] * p[i]).sum())
            reach = float(w[i].clamp(min=0).sum() if upward else w[i].clamp(max=0).sum())
            assert float((w[i] * z[i]).sum()) == pytest.approx(reach, abs=1e-9)
        else:
            assert float((w[i] * z[i]).sum()) == pytest.approx(float(b[i]), abs=1e-9)
            assert float(sizes[i]) == pytest.approx(best, rel=1e-7, abs=1e-9)
    assert 0 < infeasible < len(p)  # both branches ran


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_projection_matches_the_reference(reference_autoattack, norm: Norm) -> None:
    from autoattack.fab_projections import projection_l2, projection_linf
    p, w, b = tiny_cases(seed=7, rows=500, dims=50)
    ours = project_hyperplane_box(p, w, b, norm=norm)
    reference = (projection_linf if norm is Norm.LINF else projection_l2)(p.float(), w.float(), b.float())
    assert torch.allclose(ours.float(), reference, atol=1e-5)


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
@pytest.mark.parametrize("alpha_max,expected", [(0.1, 0.9 * 0.61 + 0.1 * 0.62), (0.5, (2 * 0.61 + 0.62) / 3)])
def test_one_step_by_hand(norm: Norm, alpha_max: float, expected: float) -> None:
    """x = (0.2, 0.5), x_k = (0.4, 0.5), boundary z_1 = 0.6 (gap -0.2, gradient (1, 0)): the steps to it
    are d_k = (0.2, 0) and d_0 = (0.4, 0) in both norms, alpha = min(0.2 / 0.6, alpha_max), and
    x_1 = (1 - alpha) (0.4 + 1.05 * 0.2) + alpha (0.2 + 1.05 * 0.4) = (1 - alpha) 0.61 + alpha 0.62."""
    x = torch.tensor([[[[0.2, 0.5]]]], dtype=torch.float64)
    x_k = torch.tensor([[[[0.4, 0.5]]]], dtype=torch.float64)
    grad = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    new = fab_step(x_k, x, torch.tensor([-0.2], dtype=torch.float64), grad, norm=norm, alpha_max=alpha_max,
                   eta=1.05)
    assert torch.allclose(new, torch.tensor([[[[expected, 0.5]]]], dtype=torch.float64))


# --- FAB-T on linear models: the minimal perturbation in closed form --------------------------------

def linear_model(classes: int, seed: int = 0) -> nn.Module:
    """Logits W x + b on 1x4x4 images, all nearly equal at x = 0.5 (so the boundaries are close)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).double().eval()
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1) + 0.05 * torch.randn(classes, dtype=torch.float64))
    return model


def minimal_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The distance to the nearest other class's region when the box is not in the way:
    min_j (z_y - z_j) / ||w_y - w_j||_dual (L1 for Linf, L2 for L2)."""
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    margin = z.gather(1, y[:, None]) - z
    dual = 1 if norm is Norm.LINF else 2
    dist = margin / (weight[y][:, None, :] - weight[None]).norm(p=dual, dim=2)
    return dist.scatter(1, y[:, None], math.inf).amin(1)


@pytest.mark.parametrize("classes", [3, 10])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_finds_the_closed_form_minimal_perturbation(norm: Norm, classes: int) -> None:
    model = linear_model(classes)
    x = 0.4 + 0.2 * torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    d_min = minimal_distance(model, x, y, norm)
    assert float(d_min.max()) < 0.4  # every minimiser stays inside the box: no coordinate moves more
    for i in range(len(y)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        found = fab_t(model, xi, yi, eps=1.02 * float(d_min[i]), norm=norm)  # target_classes=9 > classes - 1
        assert accuracy(model, found, yi) == 0.0
        assert float(distance(found, xi, norm)) <= 1.02 * float(d_min[i]) + 1e-12
        missed = fab_t(model, xi, yi, eps=0.98 * float(d_min[i]), norm=norm)
        assert torch.equal(missed, xi)  # not fooled: x itself


class CountingModel(nn.Module):
    """Records the batch size of every forward that builds a graph (one per gradient)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.grad_batches = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.grad_batches.append(x.shape[0])
        return self.inner(x)


def test_one_gradient_per_step_and_none_for_fooled_examples() -> None:
    x = torch.full((6, 1, 4, 4), 0.5, dtype=torch.float64)
    model = CountingModel(linear_model(10))
    with torch.no_grad():
        y = model(x).argmax(1)
    fab_t(model, x, y, eps=1e-9, norm="linf", steps=5, target_classes=2)
    assert model.grad_batches == [6] * 10  # nothing fooled: 2 targets x 5 steps, whole batch each
    model.grad_batches.clear()
    fab_t(model, x, y, eps=1.0, norm="linf", steps=5, target_classes=2)
    assert model.grad_batches == [6]  # all fooled at the first step: no more gradients


def test_misclassified_inputs_are_returned_unchanged() -> None:
    model = linear_model(10)
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    assert torch.equal(fab_t(model, x, wrong, eps=0.3, norm="l2"), x)


# --- threat model, shapes, randomness, manners --------------------------------------------------------

def small_conv(channels: int, size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(4 * size * size, 10)).eval()


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.05), (Norm.L2, 0.5)])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)], ids=["grey16", "rgb32"])
def test_threat_model_and_shape(norm: Norm, eps: float, shape: tuple[int, ...]) -> None:
    model = small_conv(shape[0], shape[1])
    x = torch.rand(12, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = fab_t(model, x, y, eps=eps, norm=norm, steps=10, target_classes=3)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(distance(x_adv, x, norm).max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert accuracy(model, x_adv, y) < 1.0


def test_empty_batch() -> None:
    x, y = torch.rand(0, 1, 16, 16), torch.zeros(0, dtype=torch.long)
    out = fab_t(small_conv(1, 16), x, y, eps=0.1)
    assert out.shape == x.shape


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_random_start_is_half_eps_away(norm: Norm) -> None:
    x = torch.full((4, 3, 8, 8), 0.5)
    start = random_start(x, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(distance(start, x, norm), torch.full((4,), 0.1))


def test_deterministic_with_the_same_generator() -> None:
    model = small_conv(1, 16)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)

    def run(seed: int) -> torch.Tensor:
        return fab_t(model, x, y, eps=0.5, norm="l2", steps=5, target_classes=2, restarts=3,
                     generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))


def test_model_mode_and_grads_left_as_found() -> None:
    model = small_conv(1, 16).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[5].bias.requires_grad_(False)
    x = torch.rand(6, 1, 16, 16)
    y = torch.arange(6)
    fab_t(model, x, y, eps=0.1, steps=3, target_classes=2)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[5].weight.grad is None and model[5].weight.requires_grad
    assert not model[5].bias.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -0.1}, "eps"),
    ({"eps": math.nan}, "eps"),
    ({"norm": "l1"}, "norm"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"target_classes": 0}, "target_classes"),
    ({"restarts": 0}, "restarts"),
    ({"alpha_max": 1.5}, "alpha_max"),
    ({"alpha_max": -0.1}, "alpha_max"),
    ({"eta": 0.9}, "eta"),
    ({"eta": math.inf}, "eta"),
    ({"beta": 0.0}, "beta"),
    ({"beta": 1.1}, "beta"),
    ({"beta": True}, "beta"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"eps": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        fab_t(small_conv(1, 16), torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), **args)


def test_bad_inputs_raise() -> None:
    model = small_conv(1, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fab_t(model, torch.full((2, 1, 16, 16), 1.5), torch.zeros(2, dtype=torch.long), eps=0.1)
    with pytest.raises(ValueError, match="same number"):
        fab_t(model, torch.rand(2, 1, 16, 16), torch.zeros(3, dtype=torch.long), eps=0.1)


# --- robust accuracy against the authors' FAB-T -------------------------------------------------------

def reference_fab_t(autoattack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm,
                    steps: int = 100, target_classes: int = 9) -> torch.Tensor:
    """The reference FAB-T as autoattack.py's 'standard' suite sets it up (n_restarts=1, targeted),
    run in eval mode and with the global RNG it reseeds restored afterwards."""
    from autoattack.fab_pt import FABAttack_PT
    attack = FABAttack_PT(model, norm={Norm.LINF: "Linf", Norm.L2: "L2"}[norm], n_restarts=1, n_iter=steps,
                          eps=eps, seed=0, verbose=False, device="cpu", n_target_classes=target_classes)
    attack.targeted = True
    with torch.random.fork_rng(), attack_mode(model):
        return attack.perturb(x, y)


def assert_agrees(autoattack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm,
                  steps: int = 100, target_classes: int = 9) -> None:
    found = fab_t(model, x, y, eps=eps, norm=norm, steps=steps, target_classes=target_classes)
    ours = accuracy(model, found, y)
    theirs = accuracy(model, reference_fab_t(autoattack, model, x, y, eps=eps, norm=norm, steps=steps,
                                             target_classes=target_classes), y)
    clean = accuracy(model, x, y)
    print(f"robust accuracy n={len(y)} {norm.value} eps={eps:.4f}: clean {clean:.3f}, ours {ours:.3f}, "
          f"reference {theirs:.3f}")
    assert abs(ours - theirs) <= 0.01 + 1e-9
    assert ours < clean


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.1), (Norm.L2, 1.0)])
def test_agrees_with_reference_on_the_digits_mixture(reference_autoattack, digits_ensemble, norm: Norm,
                                                     eps: float) -> None:
    """The default suite's share: the mixture, 100 digits, all 100 steps, the 3 nearest targets."""
    mixture, x, y = digits_ensemble
    assert_agrees(reference_autoattack, mixture, x[:100], y[:100], eps=eps, norm=norm, target_classes=3)


@pytest.mark.slow
@pytest.mark.parametrize("member", [None, 0, 1, 2], ids=["mixture", "member0", "member1", "member2"])
@pytest.mark.parametrize("dataset,norm,eps", [
    ("digits", Norm.LINF, 0.1), ("digits", Norm.L2, 1.0),
    ("cifar", Norm.LINF, 8 / 255), ("cifar", Norm.L2, 0.5),
])
def test_agrees_with_reference_fab_t_standard(request, reference_autoattack, dataset: str, norm: Norm,
                                              eps: float, member: int | None) -> None:
    """AutoAttack's standard FAB-T (9 targets, 100 steps, 1 restart) on all 200 fixture images."""
    mixture, x, y = request.getfixturevalue(f"{dataset}_ensemble")
    model = mixture if member is None else mixture.members[member]
    assert_agrees(reference_autoattack, model, x, y, eps=eps, norm=norm)
