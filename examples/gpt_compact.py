"""A small Flax NNX transformer language model pruned by MLP units, compacted, and exported
with a symbolic batch: the compact model generates the same text as the pruned one.

``python -m examples.gpt_compact --steps 300 --sparsity 0.5``

Character-level, trained on the Zen of Python (Python's ``this`` module: real English text
that every Python has): token and position embeddings, pre-LayerNorm blocks of causal
multi-head attention (one fused qkv projection split into heads) and a gelu MLP, a head tied
to the token embedding. ``flipout.unit_groups`` finds the units that can go (the MLP's hidden
units: the residual stream is read by LayerNorm and the heads are split by a reshape, so
those stay), ``prune(structure="unit")`` removes half of them, and ``flipout.compact`` cuts
them out of the MLP kernels.
"""

import argparse
import codecs
import contextlib
import io
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flipout_jax as flipout

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
  import this
TEXT = codecs.decode(this.s, "rot13")
VOCAB = sorted(set(TEXT))
CONTEXT = 32


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention and a gelu MLP, each added to the stream."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.fc = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.out = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    batch, length, dim = h.shape
    split = lambda x: x.reshape(batch, length, self.heads, dim // self.heads)
    q, k, v = map(split, jnp.split(self.qkv(self.ln1(h)), 3, axis=-1))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim // self.heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    attended = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, dim)
    h = h + self.proj(attended)
    return h + self.out(jax.nn.gelu(self.fc(self.ln2(h))))


class GPT(nnx.Module):
  """Tokens (batch, length) -> next-token logits (batch, length, vocab)."""

  def __init__(self, vocab: int, dim: int, heads: int, layers: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (CONTEXT, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    h = self.embed(tokens) + self.position[: tokens.shape[1]]
    for block in self.blocks:
      h = block(h)
    return self.embed.attend(self.ln(h))  # the head tied to the token embedding


def windows(rng: np.random.Generator, data: np.ndarray, count: int) -> tuple[np.ndarray, ...]:
  starts = rng.integers(0, len(data) - CONTEXT - 1, size=count)
  take = lambda offset: np.stack([data[s + offset : s + offset + CONTEXT] for s in starts])
  return take(0), take(1)


def generate(apply: callable, prompts: jax.Array, count: int) -> np.ndarray:
  """Greedy: each step appends the argmax of the last position's logits, and the context
  slides to keep ``CONTEXT`` tokens."""
  context, new = prompts, []
  for _ in range(count):
    token = jnp.argmax(apply(context)[:, -1], axis=-1)
    new.append(token)
    context = jnp.concatenate([context[:, 1:], token[:, None]], axis=1)
  return np.stack(new, axis=1)


def main(argv: Sequence[str] | None = None) -> int:
  """Trains with prune(structure="unit") last, compacts, exports, generates with both."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--sparsity", type=float, default=0.5, help="of the MLP units' weights")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  data = np.array([VOCAB.index(c) for c in TEXT], np.int32)
  model = GPT(len(VOCAB), dim=32, heads=4, layers=2, rngs=nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model)
  apply_fn = lambda params, tokens: nnx.merge(graphdef, params)(tokens)
  example, _ = windows(np.random.default_rng(args.seed), data, 2)
  is_mlp = lambda path, leaf: "fc" in jax.tree_util.keystr(path) and leaf.ndim == 2
  groups = flipout.unit_groups(apply_fn, params, example, where=is_mlp)
  tx = optax.chain(
      optax.adam(3e-3),
      flipout.prune(
          args.sparsity, total_steps=args.steps, where=is_mlp, structure=flipout.units(groups)
      ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model: GPT, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model: GPT) -> jax.Array:
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(args.seed)
  for _ in range(args.steps):
    loss = train_step(model, optimizer, *map(jnp.asarray, windows(rng, data, 16)))
  print(f"loss {float(loss):.3f} nats/char after {args.steps} steps")
  _, params = nnx.split(model)
  print(flipout.summary(params, where=is_mlp))
  compacted = flipout.compact(apply_fn, params, example)
  print(compacted.report)
  # The export closes over the compact params: the serialized bytes are the whole model.
  forward = jax.jit(lambda tokens: compacted.apply(compacted.params, tokens))
  batch = jax.export.symbolic_shape("batch")[0]
  blob = jax.export.export(forward)(jax.ShapeDtypeStruct((batch, CONTEXT), jnp.int32))
  restored = jax.export.deserialize(blob.serialize())
  print(f"exported: {len(blob.serialize()):,} bytes, any batch size")
  prompts = jnp.asarray(windows(np.random.default_rng(args.seed + 1), data, 3)[0])
  pruned_text = generate(lambda t: apply_fn(params, t), prompts, 40)
  compact_text = generate(restored.call, prompts, 40)
  for prompt, continuation in zip(np.asarray(prompts), compact_text):
    print(
        repr("".join(VOCAB[i] for i in prompt)), "->", repr("".join(VOCAB[i] for i in continuation))
    )
  same = bool((pruned_text == compact_text).all())
  print(f"exported compact model (symbolic batch) generates the same tokens: {same}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
