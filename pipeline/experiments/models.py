"""Models for the recipes and benchmarks: small classifiers, and a byte-level GPT-2 (``transformers``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trajstore._extras import require
from trajstore.errors import InvalidArgumentError

BYTE_VOCAB = 256  # one token per byte value


class CNN1D(nn.Module):
    """A 1D-CNN for MNIST-1D (input (B, 1, 40)), about 9.6K parameters."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, 20)
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, 10)
        )
        self.head = nn.Linear(channels * 10, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU in between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class GPTSize:
    """The shape of a byte-level GPT-2: layers, width, heads and context length (tokens)."""

    layers: int
    width: int
    heads: int
    context: int

    def param_count(self) -> int:
        """Parameters of :class:`ByteGPT` of this size (lm_head tied to the token embedding)."""
        w = self.width
        per_layer = 12 * w * w + 13 * w  # qkv (3w² + 3w), proj (w² + w), MLP (8w² + 5w), two LayerNorms (4w)
        return self.layers * per_layer + (BYTE_VOCAB + self.context) * w + 2 * w  # + wte, wpe, final LayerNorm


GPT_SIZES = {
    # GPT-2 small's shape (768 wide, 12 heads) 15 layers deep: with a 256-byte vocabulary 12 layers hold only
    # 85.5M parameters, 15 hold 106.7M (GPT-2 small's 124M comes from its 50,257-token embedding)
    "gpt-small": GPTSize(layers=15, width=768, heads=12, context=256),
    "gpt-tiny": GPTSize(layers=2, width=64, heads=2, context=64),  # 121K parameters: trains in seconds
}


def gpt_size_for(params: int, width: int = 768, heads: int | None = None, context: int = 256) -> GPTSize:
    """The GPT-2-shaped size of ``width`` (``heads`` default width // 64) whose layer count brings its
    parameter count nearest ``params`` (at least one layer)."""
    heads = heads or max(1, width // 64)
    one = GPTSize(1, width, heads, context)
    per_layer = one.param_count() - GPTSize(0, width, heads, context).param_count()
    fixed = GPTSize(0, width, heads, context).param_count()
    return GPTSize(max(1, round((params - fixed) / per_layer)), width, heads, context)


class ByteGPT(nn.Module):
    """A GPT-2 causal language model over bytes (``transformers.GPT2LMHeadModel``, built from a config:
    nothing is downloaded), dropout off so a P-BFGS line search sees a deterministic loss.

    ``model(x)`` with x (B, T) byte values (int64) returns next-byte logits (B, 256, T): class scores in
    dimension 1, as ``nn.functional.cross_entropy(logits, y)`` and ``logits.argmax(1)`` expect, so the
    classification runner trains and evaluates it unchanged. ``model(input_ids=x, labels=y)`` returns
    ``{"loss", "logits"}`` for the Hugging Face ``Trainer`` (y is x shifted by one byte, as the loaders
    make it; no shift happens inside).
    """

    def __init__(self, size: GPTSize):
        super().__init__()
        transformers = require("transformers", "transformers", "the byte-level GPT recipes (gpt-tiny, gpt-small)")
        if size.width % size.heads:
            raise InvalidArgumentError(f"GPT width {size.width} is not a multiple of its {size.heads} heads")
        config = transformers.GPT2Config(vocab_size=BYTE_VOCAB, n_positions=size.context, n_embd=size.width,
                                         n_layer=size.layers, n_head=size.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.size = size
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.gpt(input_ids=input_ids).logits.transpose(1, 2)  # (B, T, V) -> (B, V, T)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}
