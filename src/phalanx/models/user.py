"""A user's own `nn.Module` as an ensemble member: input normalisation and layer taps by module path.

phalanx's methods need three things from a member: logits for pixels in [0, 1], the output of a
named intermediate layer (DVERGE distils features, RRM matches the penultimate representation), and
the list of layers an epoch may draw from. `ModuleMember` gives any module all three without
changing it: normalisation is a buffer applied before the module, a tap is a forward hook on the
module at that path (the forward stops there, as the built-in models stop at their stage), and the
layer list is found by running the module once and recording which convolutions and linear layers
it calls, in call order. A factory named in YAML (`model.factory: "pkg.mod:fn"`) is imported only
because the user named it (`import_factory`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from phalanx.config import ConfigError
from phalanx.models.base import Classifier, InputSpec

LOGITS = "logits"  # the last layer of every member: the module's output
# The modules whose outputs are taps by default: their outputs are pre-activation features, as the
# DVERGE authors' get_features(..., before_relu=True) reads them.
TAP_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ModelFactoryError(ConfigError):
    """A user's model factory that cannot be imported or does not build a usable classifier."""


class _TapReached(Exception):
    """Raised by a tap's hook to stop the forward once the tapped output exists."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class ModuleMember(Classifier):
    """A user's module as a phalanx member: pixels in [0, 1] in, logits out, taps by module path.

    `spec.mean`/`spec.std` are applied before the module (mean 0, std 1: the module sees raw pixels).
    `layers`: the module paths an epoch may tap (e.g. DVERGE's layer draw), "logits" added last;
    empty = discovered (`discover_layers`). A tap returns the tapped module's output as it is: a
    convolution's or linear layer's output is the pre-activation value that DVERGE taps.
    """

    def __init__(self, module: nn.Module, spec: InputSpec, layers: Sequence[str] = ()) -> None:
        super().__init__(spec)
        self.module = module
        names = tuple(layers) or discover_layers(module, spec)
        for name in names:
            if name != LOGITS:
                _submodule(module, name)
        self.layer_names = names if names[-1:] == (LOGITS,) else (*names, LOGITS)
        self._head: str | None = None  # path of the classifier head, found on first use

    def _run(self, z: torch.Tensor, stop_at: str | None, pre_activation: bool) -> torch.Tensor:
        if stop_at is None or stop_at == LOGITS:
            return self.module(z)

        def stop(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            raise _TapReached(output)

        handle = _submodule(self.module, stop_at).register_forward_hook(stop)
        try:
            self.module(z)
        except _TapReached as reached:
            return reached.value
        finally:
            handle.remove()
        raise RuntimeError(f"the forward of {type(self.module).__name__} never called its layer {stop_at!r}")

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last linear layer the forward calls (the representation RRM matches)."""
        if self._head is None:
            self._head = _last_linear(self.module, self.spec)

        def grab(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            raise _TapReached(inputs[0])

        handle = self.module.get_submodule(self._head).register_forward_pre_hook(grab)
        try:
            self.module(self.normalize(x))
        except _TapReached as reached:
            return reached.value.flatten(1)
        finally:
            handle.remove()
        raise RuntimeError("unreachable: the head is called by the forward")


def _submodule(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        raise ModelFactoryError(f"layer {path!r} is not a module of {type(module).__name__}; "
                                f"its modules are {names[:40]}{' ...' if len(names) > 40 else ''}") from None


def _called_in_order(module: nn.Module, spec: InputSpec, types: tuple[type[nn.Module], ...]) -> list[str]:
    """Paths of the `types` submodules one forward of a probe batch calls, in call order, each once."""
    order: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if name and isinstance(sub, types):
            handles.append(sub.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name)))
    was_training = module.training
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        with torch.no_grad():
            out = module(torch.zeros(2, spec.channels, spec.size, spec.size, device=device))
    except Exception as exc:  # the user's forward: any failure means it does not fit this data
        first = (str(exc).splitlines() or [""])[0]
        raise ModelFactoryError(f"{type(module).__name__} fails on a batch of 2 images of shape "
                                f"{(spec.channels, spec.size, spec.size)} ({type(exc).__name__}: {first}); "
                                "a member must take this dataset's images") from None
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelFactoryError(f"{type(module).__name__} returns {shape} for a batch of 2 images of shape "
                                f"{(spec.channels, spec.size, spec.size)}; a member must return logits of shape "
                                f"(batch, {spec.num_classes}) (one per class of the dataset)")
    return list(dict.fromkeys(order))


def discover_layers(module: nn.Module, spec: InputSpec) -> tuple[str, ...]:
    """The tap points of `module`: the convolutions and linear layers its forward calls, in call
    order, then "logits" (the last linear layer, when it gives the logits, is "logits" itself)."""
    order = _called_in_order(module, spec, TAP_TYPES)
    if order and isinstance(module.get_submodule(order[-1]), nn.Linear):
        order = order[:-1]
    return (*order, LOGITS)


def _last_linear(module: nn.Module, spec: InputSpec) -> str:
    order = _called_in_order(module, spec, (nn.Linear,))
    if not order:
        raise ModelFactoryError(f"{type(module).__name__} calls no nn.Linear layer: its penultimate "
                                "representation (the input of its classifier head) cannot be found")
    return order[-1]


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The callable named by "package.module:attribute" (dots after the colon walk attributes).

    Importing runs that module's code: phalanx does it only for a factory the user named.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelFactoryError(f"model.factory = {path!r} is not allowed; expected 'package.module:callable', "
                                "e.g. 'mypkg.nets:resnet18'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelFactoryError(f"model.factory = {path!r} cannot be imported ({exc}); is the package installed, "
                                "or its folder on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelFactoryError(f"model.factory = {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFactoryError(f"model.factory = {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_user_model(factory: str, kwargs: Mapping[str, Any], spec: InputSpec,
                     layers: Sequence[str] = ()) -> ModuleMember:
    """A fresh member from a user's factory, called with `kwargs`, wrapped with `spec`'s normalisation."""
    try:
        module = import_factory(factory)(**dict(kwargs))
    except ModelFactoryError:
        raise
    except TypeError as exc:
        raise ModelFactoryError(f"model.factory = {factory!r} refused model.kwargs = {dict(kwargs)!r}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelFactoryError(f"model.factory = {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return ModuleMember(module, spec, layers)


def as_member(module: nn.Module, spec: InputSpec, layers: Sequence[str] = ()) -> Classifier:
    """`module` as a member: a phalanx Classifier as it is, any other module wrapped."""
    if isinstance(module, Classifier):
        return module
    return ModuleMember(module, spec, layers)
