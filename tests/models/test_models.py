import math

import pytest
import torch
import torch.nn.functional as F

from phalanx.models import Arch, InputSpec, Mixture, build_model, mixture_log_probs

CIFAR = InputSpec(3, 32, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
DIGITS = InputSpec(1, 16, 10, (0.3,), (0.4,))
MNIST = InputSpec(1, 28, 7, (0.13,), (0.31,))


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("spec", [CIFAR, DIGITS, MNIST], ids=["cifar", "digits", "mnist-7cls"])
def test_every_model_adapts_to_the_dataset(arch, spec):
    model = build_model(arch, spec)
    x = torch.rand(3, spec.channels, spec.size, spec.size)
    assert model(x).shape == (3, spec.num_classes)


@pytest.mark.parametrize("arch", list(Arch))
def test_feature_taps_stop_early_and_end_at_logits(arch):
    model = build_model(arch, CIFAR).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.features(x, model.layer_names[-1]), model(x), atol=1e-6)
    pre = model.features(x, model.layer_names[0], pre_activation=True)
    post = model.features(x, model.layer_names[0], pre_activation=False)
    assert pre.shape == post.shape and pre.shape[0] == 2
    assert (pre < 0).any() and not torch.equal(pre, post)
    if isinstance(model.act, torch.nn.ReLU):
        assert (post >= 0).all()


def test_layer_counts_match_the_papers():
    assert len(build_model("resnet20", CIFAR).layer_names) == 20  # DVERGE depth: 1 + 18 convs + fc
    assert len(build_model("resnet26", CIFAR).layer_names) == 26
    assert build_model("conv", CIFAR).layer_names == ("conv1", "conv2", "fc1", "fc2", "logits")


def test_seed_conv_is_the_lenet_of_the_report():
    model = build_model("conv", CIFAR)
    params = sum(p.numel() for p in model.parameters())
    assert params == 62006  # the classic CIFAR LeNet: 6 and 16 5x5 filters, 120-84-10


def test_gal_conv_structures():
    c3, c4 = build_model("conv3", CIFAR), build_model("conv4", CIFAR)
    widths3 = [m.out_channels for m in c3.modules() if isinstance(m, torch.nn.Conv2d)]
    widths4 = [m.out_channels for m in c4.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths3 == [32, 64, 128] and widths4 == [32, 64, 128, 128]
    assert c3.act.__class__.__name__ == "LeakyReLU"


def test_models_normalize_inside():
    model = build_model("conv3", DIGITS)
    x = torch.rand(2, 1, 16, 16)
    z = model.normalize(x)
    assert torch.allclose(z, (x - 0.3) / 0.4)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_seed_conv_equals_the_textbook_order(activation):
    """The folded normalization and pooling before activating change neither values nor gradients."""
    torch.manual_seed(0)
    model = build_model("conv", CIFAR, activation=activation).double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    conv1 = model.stages["conv1"]
    mean, std = torch.tensor(CIFAR.mean).view(1, 3, 1, 1), torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    z = F.conv2d((x - mean) / std, conv1.weight, conv1.bias)
    torch.testing.assert_close(model.features(x, "conv1"), z)
    for name in ("conv2", "fc1", "fc2", "logits"):  # activation, then the stage's body (pool first)
        z = model.stages[name](model.act(z))
        torch.testing.assert_close(model.features(x, name), z)
        torch.testing.assert_close(model.features(x, name, pre_activation=False),
                                   z if name == "logits" else model.act(z))
    (g_textbook,) = torch.autograd.grad(z.square().sum(), x)
    (g_model,) = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(g_model, g_textbook)


def test_unknown_names_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed.*conv"):
        build_model("vgg", CIFAR)
    with pytest.raises(ValueError, match="allowed.*leaky_relu"):
        build_model("conv", CIFAR, activation="tanh")
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        build_model("conv", CIFAR).features(torch.rand(1, 3, 32, 32), "fc9")
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("conv", InputSpec(1, 8, 10, (0.5,), (0.5,)))


def test_mixture_averages_probabilities():
    members = [build_model("conv", DIGITS) for _ in range(3)]
    mix = Mixture(members).eval()
    x = torch.rand(4, 1, 16, 16)
    probs = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    assert torch.allclose(mix(x).exp(), probs, atol=1e-6)
    assert mix.member_logits(x).shape == (3, 4, 10)


def test_mixture_log_probs_is_stable_for_huge_logits():
    logits = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])
    out = mixture_log_probs(logits)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full((1, 2), math.log(0.5)), atol=1e-6)
    with pytest.raises(ValueError, match="at least one member"):
        Mixture([])
