"""Stacked members (models/stacked.py): the same features, gradients and BatchNorm statistics as one call each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phalanx.models import Classifier, InputSpec, build_model
from phalanx.models.stacked import stack_members

SPEC = InputSpec(channels=3, size=16, num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
ARCHS = ["conv", "conv3", "conv4", "resnet20"]


def _members(arch: str, n: int = 3, train: bool = True) -> list[Classifier]:
    torch.manual_seed(0)
    members = [build_model(arch, SPEC).double().train(train) for _ in range(n)]
    with torch.no_grad():  # BatchNorm statistics and affine parameters that differ per member
        for m in members:
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
    return members


def _per_member(out: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Convolutional taps come channel-stacked, linear ones and logits member-major."""
    return list(out.chunk(n, dim=1)) if out.dim() == 4 else list(out.unbind(0))


def _inputs(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(5, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_equals_each_members_own_call(arch, train):
    members = _members(arch, train=train)
    reference = copy.deepcopy(members)
    stack = stack_members(members)
    assert stack is not None
    xs = _inputs(len(members))
    for layer in members[0].layer_names:
        for pre in (True, False):
            got = _per_member(stack.features(stack.stack(xs), layer, pre_activation=pre), len(members))
            for m, x, out in zip(reference, xs, got):
                torch.testing.assert_close(out, m.features(x, layer, pre_activation=pre), msg=f"{layer} pre={pre}")
    for m, x, out in zip(reference, xs, stack.logits(stack.stack(xs)).unbind(0)):
        torch.testing.assert_close(out, m(x))
    # train-mode BatchNorm updated each member's running statistics as the member's own calls did
    for m, r in zip(members, reference):
        for (name, a), b in zip(m.named_buffers(), r.buffers()):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("arch", ["conv", "resnet20"])
def test_gradients_flow_to_each_member_and_see_its_updates(arch):
    members = _members(arch)
    reference = copy.deepcopy(members)
    stack = stack_members(members)
    xs, y = _inputs(len(members)), torch.arange(5) % 10
    F.cross_entropy(stack.logits(stack.stack(xs)).flatten(0, 1), y.repeat(len(members))).backward()
    for m, x in zip(reference, xs):
        (F.cross_entropy(m(x), y) / len(members)).backward()
    for m, r in zip(members, reference):
        for (name, p), q in zip(m.named_parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():  # a step on the members is seen by the next stacked call
        for m in members:
            for p in m.parameters():
                p.sub_(0.1 * p.grad)
    for m, x, out in zip(members, xs, stack.logits(stack.stack(xs)).unbind(0)):
        torch.testing.assert_close(out, m(x))


def test_parameters_fixed_concatenates_once_and_lets_go_on_exit():
    members = _members("conv", train=False)
    stack = stack_members(members)
    x = stack.stack(_inputs(3))
    before = stack.logits(x)
    with stack.parameters_fixed():
        torch.testing.assert_close(stack.logits(x), before)
        with torch.no_grad():
            members[0].stages["logits"].bias.add_(1.0)
        torch.testing.assert_close(stack.logits(x), before)  # the kept concatenation
    after = stack.logits(x)
    torch.testing.assert_close(after[0], before[0] + 1.0)
    torch.testing.assert_close(after[1:], before[1:])


def test_members_that_cannot_be_stacked():
    assert stack_members(_members("conv", n=1)) is None
    assert stack_members([build_model("conv", SPEC), build_model("conv3", SPEC)]) is None
    assert stack_members([build_model("conv", SPEC), build_model("conv", SPEC, activation="leaky_relu")]) is None
    other = InputSpec(channels=3, size=16, num_classes=7, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert stack_members([build_model("conv", SPEC), build_model("conv", other)]) is None

    class Opaque(Classifier):  # not declared stackable: its forward could mix members
        layer_names = ("logits",)

        def __init__(self) -> None:
            super().__init__(SPEC)
            self.fc = torch.nn.Linear(3 * 16 * 16, 10)

        def _run(self, z, stop_at, pre_activation):
            return self.fc(z.flatten(1))

    assert stack_members([Opaque(), Opaque()]) is None


def test_stack_needs_one_input_per_member():
    stack = stack_members(_members("conv"))
    with pytest.raises(ValueError, match="one input per member"):
        stack.stack(_inputs(2))


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_logits_equal_the_stacked_copies_and_each_members_own_call(arch):
    members = _members(arch, train=False)
    stack = stack_members(members)
    x = _inputs(1)[0]
    shared = stack.shared_logits(x)
    torch.testing.assert_close(shared, stack.logits(stack.stack([x] * len(members))))
    for m, out in zip(members, shared.unbind(0)):
        torch.testing.assert_close(out, m(x))


def test_members_with_other_input_statistics_are_not_stacked():
    other = InputSpec(channels=3, size=16, num_classes=10, mean=(0.1, 0.2, 0.3), std=(0.3, 0.3, 0.3))
    assert stack_members([build_model("resnet20", SPEC), build_model("resnet20", other)]) is None
