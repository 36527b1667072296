"""What makes line-search trials cheap and faithful: the loss-only closure protocol, RNG replay, buffer restore.

* **Closure protocol.** A closure whose signature names a ``backward`` parameter
  (``def closure(backward=True)``) is a *loss-only-capable* closure: the optimizer calls
  ``closure(backward=False)`` under ``torch.no_grad()`` for line-search trials (forward only, as the
  paper's code), and ``closure()`` / ``closure(backward=True)`` where it needs a gradient. Any other
  closure (``closure()``, Lightning's ``closure(*args, **kwargs)``) is called plainly everywhere, so
  each trial also runs its backward: correct, only slower.
* **RNG replay.** :class:`RngState` captures the CPU generator and the CUDA generators of the
  parameters' devices; restoring the state taken before f₀ before every trial gives each trial f₀'s
  dropout masks (the same function f, evaluated at another point).
* **Buffers.** :class:`BufferGuard` snapshots the module buffers (BN running statistics) after f₀'s
  forward and puts them back after each trial, so a step leaves them as one training forward does.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import nn


def accepts_backward(closure: Callable) -> bool:
    """Whether ``closure`` names a ``backward`` parameter (``*args`` / ``**kwargs`` alone do not count)."""
    try:
        param = inspect.signature(closure).parameters.get("backward")
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def as_float(value: "torch.Tensor | float") -> float:
    """A closure's loss as a Python float (a tensor or a number)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class RngState:
    """The global CPU generator's state and those of the given CUDA devices, to put back later."""

    def __init__(self, devices: Iterable[torch.device] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    @staticmethod
    def devices_of(params: Iterable[torch.Tensor | None]) -> list[torch.device]:
        """The distinct CUDA devices holding ``params`` (the generators dropout on them draws from)."""
        return list(dict.fromkeys(p.device for p in params if p is not None and p.device.type == "cuda"))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


class BufferGuard:
    """The buffers a step must leave as after one forward: given, a module's, or found during f₀.

    * ``buffers``: exactly these tensors (the pre-existing ``buffers=`` argument);
    * ``module``: every buffer of ``module`` (re-read at each step, so reassigned buffers are followed);
    * neither: the buffers of every module that runs during the first step's f₀ evaluation, found with
      a global forward pre-hook held only while that closure runs (pass ``module=`` when some module
      runs in trials but not in f₀, or to avoid the hook, e.g. under ``torch.compile``).
    """

    def __init__(self, module: nn.Module | None = None, buffers: Iterable[torch.Tensor] | None = None):
        self._fixed = None if buffers is None else list(buffers)
        self._modules: list[nn.Module] | None = None if module is None else list(module.modules())

    def _entries(self) -> list[tuple[nn.Module | None, str, torch.Tensor]]:
        if self._fixed is not None:
            return [(None, "", b) for b in self._fixed]
        return [(m, name, b) for m in self._modules or () for name, b in m._buffers.items() if b is not None]

    def discovering(self) -> "_Discovery":
        """Context manager for f₀'s evaluation: records the modules that run, the first time only."""
        return _Discovery(self if self._fixed is None and self._modules is None else None)

    def save(self) -> list[tuple[nn.Module | None, str, torch.Tensor, torch.Tensor]]:
        """(module, name, tensor, copy) for every buffer, copied now."""
        return [(m, name, b, b.detach().clone()) for m, name, b in self._entries()]

    @staticmethod
    @torch.no_grad()
    def restore(saved: list[tuple[nn.Module | None, str, torch.Tensor, torch.Tensor]]) -> None:
        """Put every saved buffer back, into the tensor the module holds now when it was reassigned."""
        for module, name, tensor, copy in saved:
            current = tensor if module is None else module._buffers.get(name)
            if module is not None and (current is None or current.shape != copy.shape or current.dtype != copy.dtype):
                module._buffers[name] = copy.clone()  # the forward replaced it by something else
            else:
                current.copy_(copy)


class _Discovery:
    """Holds a global forward pre-hook while f₀ runs and hands the modules it saw to the guard."""

    def __init__(self, guard: BufferGuard | None):
        self.guard, self.seen, self.handle = guard, {}, None

    def __enter__(self) -> "_Discovery":
        if self.guard is not None:
            self.handle = nn.modules.module.register_module_forward_pre_hook(self._saw)
        return self

    def _saw(self, module: nn.Module, args: tuple) -> None:
        self.seen.setdefault(id(module), module)

    def __exit__(self, exc_type, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            if exc_type is None:  # a closure that raised is looked at again next step
                self.guard._modules = list(self.seen.values())
