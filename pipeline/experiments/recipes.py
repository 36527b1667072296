"""Recipes: a model, its data and its loss. Built-in ones use local data only; users plug in theirs.

A user recipe is ``"package.module:function"``; the function is called with the keyword
arguments it accepts among ``seed``, ``batch_size`` and ``label_noise`` and returns
``(model, train_loader, test_loader, loss_fn)``.

The ``gpt-*`` recipes are byte-level causal language models (GPT-2 built from a ``transformers`` config,
nothing downloaded) trained on the standard library's own sources, split by file. They fit the
classification runner: the model returns logits (B, 256, T), the loss is next-byte cross entropy, the
"accuracy" is next-byte accuracy, and the report adds perplexity = exp(mean held-out loss).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from trajstore.errors import InvalidArgumentError

from .data import byte_loaders, digits_arrays, loaders, mnist1d_arrays, stdlib_bytes
from .models import CNN1D, GPT_SIZES, ByteGPT, mlp


@dataclass
class Recipe:
    """Everything a run needs to train and evaluate one model."""

    model: nn.Module
    train: DataLoader
    test: DataLoader
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    language_model: bool = False  # next-token targets: the report adds perplexity = exp(test loss)


def _mnist1d_cnn(seed: int, batch_size: int, label_noise: float) -> Recipe:
    torch.manual_seed(seed)
    train, test = loaders(mnist1d_arrays(), batch_size, seed, label_noise, channel_dim=True)
    return Recipe(CNN1D(), train, test, nn.functional.cross_entropy)


def _mnist1d_mlp(seed: int, batch_size: int, label_noise: float) -> Recipe:
    torch.manual_seed(seed)
    train, test = loaders(mnist1d_arrays(), batch_size, seed, label_noise)
    return Recipe(mlp([40, 100, 100, 10]), train, test, nn.functional.cross_entropy)


def _digits_mlp(seed: int, batch_size: int, label_noise: float) -> Recipe:
    torch.manual_seed(seed)
    train, test = loaders(digits_arrays(), batch_size, seed, label_noise)
    return Recipe(mlp([64, 64, 10]), train, test, nn.functional.cross_entropy)


# bytes of standard-library source per recipe (train, held out): an epoch of gpt-tiny takes seconds on a CPU
GPT_TEXT = {"gpt-tiny": (32 << 10, 8 << 10), "gpt-small": (16 << 20, 1 << 20)}


def gpt_recipe(name: str, seed: int, batch_size: int, label_noise: float = 0.0) -> Recipe:
    """Byte-level GPT recipe ``name`` (a key of :data:`~.models.GPT_SIZES`): the model, loaders of
    next-byte windows of its context over :data:`GPT_TEXT` bytes, and next-byte cross entropy.
    MissingDependencyError without ``transformers``; InvalidArgumentError for label noise."""
    if label_noise:
        raise InvalidArgumentError(f"label noise (--label-noise) {label_noise} applies to classification recipes; "
                                   f"the language model {name!r} takes 0")
    size = GPT_SIZES[name]
    torch.manual_seed(seed)
    model = ByteGPT(size)
    train, test = byte_loaders(*stdlib_bytes(*GPT_TEXT[name]), size.context, batch_size, seed)
    return Recipe(model, train, test, nn.functional.cross_entropy, language_model=True)


def _gpt_tiny(seed: int, batch_size: int, label_noise: float) -> Recipe:
    return gpt_recipe("gpt-tiny", seed, batch_size, label_noise)


def _gpt_small(seed: int, batch_size: int, label_noise: float) -> Recipe:
    return gpt_recipe("gpt-small", seed, batch_size, label_noise)


BUILTIN: dict[str, Callable[[int, int, float], Recipe]] = {
    "mnist1d-cnn": _mnist1d_cnn,
    "mnist1d-mlp": _mnist1d_mlp,
    "digits-mlp": _digits_mlp,
    "gpt-tiny": _gpt_tiny,  # 121K parameters, context 64
    "gpt-small": _gpt_small,  # 106.7M parameters, context 256
}


def resolve_recipe(name: str) -> Callable:
    """The function behind recipe ``name`` (a built-in one, or a user's ``module:function``, imported
    now); InvalidArgumentError when it does not exist. Nothing is built."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, colon, func_name = name.partition(":")
    if not colon or not module_name or not func_name:
        raise InvalidArgumentError(
            f"unknown recipe {name!r}; built-in recipes: {', '.join(BUILTIN)}, or give module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot load recipe {name!r}: {exc}; run from the folder that holds "
                                   f"{module_name.split('.')[0]} (`trajstore train` and `import --like` import "
                                   "from the current directory), or add that folder to PYTHONPATH") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InvalidArgumentError(f"cannot load recipe {name!r}: module {module_name!r} has no function "
                                   f"{func_name!r}")
    return func


def build_recipe(name: str, *, seed: int, batch_size: int, label_noise: float = 0.0) -> Recipe:
    """A built-in recipe by name, or a user's ``module:function``."""
    func = resolve_recipe(name)
    if name in BUILTIN:
        return func(seed, batch_size, label_noise)
    offered = {"seed": seed, "batch_size": batch_size, "label_noise": label_noise}
    accepted = inspect.signature(func).parameters
    torch.manual_seed(seed)
    result = func(**{k: v for k, v in offered.items() if k in accepted})
    if not isinstance(result, Recipe):
        try:
            model, train, test, loss = result
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"recipe {name!r} must return (model, train_loader, test_loader, loss_fn)") from None
        result = Recipe(model, train, test, loss)
    return result


def with_generator(recipe: Recipe, name: str, seed: int) -> Recipe:
    """``recipe`` ready for a resumable run (``train``), which checkpoints the train loader's generator so that a
    resumed run sees the batches the uninterrupted one would: a loader shuffling with torch's global generator
    cannot be resumed so (refused, with the fix); one that does not shuffle gets a generator of its own (it seeds
    only worker processes). Other uses of a recipe (``import --like``: its model only) need neither."""
    train = recipe.train
    if not isinstance(train, DataLoader):
        raise InvalidArgumentError(f"recipe {name!r}: its train loader must be a torch DataLoader, got "
                                   f"{type(train).__name__}")
    if train.generator is not None:
        return recipe
    own = getattr(train.sampler, "generator", None)  # e.g. DataLoader(sampler=RandomSampler(ds, generator=g))
    if own is not None:
        train.generator = own  # the generator that orders the batches is the one a checkpoint must hold
        return recipe
    if isinstance(train.sampler, RandomSampler):
        raise InvalidArgumentError(
            f"recipe {name!r}: its train DataLoader shuffles with torch's global random generator, so a run could "
            "not be resumed with the batches it would have seen. Give it a generator of its own: "
            "DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(seed)), with seed an argument "
            "of the recipe function (it receives seed, batch_size and label_noise when it takes them)")
    train.generator = torch.Generator().manual_seed(seed)
    return recipe
