"""unit_groups reads coupled units from the traced model; structure="unit" with them prunes
what flipout.compact can remove."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout


class _Residual(nn.Module):
  """A stem, a residual block (c2 adds into the stem's stream), a hidden layer and a head."""

  norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    y = nn.relu(nn.Conv(6, (3, 3), name="c1")(x))
    x = nn.relu(x + nn.Conv(8, (3, 3), name="c2")(y))
    x = x.mean(axis=(1, 2))
    hidden = nn.Dense(16, name="hidden")(x)
    if self.norm:
      hidden = nn.LayerNorm(name="norm")(hidden)
    return nn.Dense(10, name="head")(nn.relu(hidden))


def _linen(norm=False):
  model = _Residual(norm)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, images


def test_a_residual_stream_is_one_group_per_channel_and_outputs_are_never_pruned():
  apply_fn, params, images = _linen()
  groups = flipout.unit_groups(apply_fn, params, images)
  np.testing.assert_array_equal(groups.ids["stem"]["kernel"], groups.ids["c2"]["kernel"])
  # The stem's bias follows its units; the head's (the logits) follows none.
  np.testing.assert_array_equal(groups.ids["stem"]["bias"], groups.ids["stem"]["kernel"])
  assert groups.where["stem"]["bias"] and not groups.kernels["stem"]["bias"]
  assert groups.ids["head"]["bias"] is None and not groups.where["head"]["bias"]
  own = [groups.ids["stem"]["kernel"], groups.ids["c1"]["kernel"], groups.ids["hidden"]["kernel"]]
  ids = np.concatenate(own)
  assert len(np.unique(ids)) == ids.size == 8 + 6 + 16  # no other coupling
  assert (ids >= 0).all()
  np.testing.assert_array_equal(groups.ids["head"]["kernel"], -1)


def test_a_layer_norm_pins_its_units():
  apply_fn, params, images = _linen(norm=True)
  groups = flipout.unit_groups(apply_fn, params, images)
  np.testing.assert_array_equal(groups.ids["hidden"]["kernel"], -1)
  assert (groups.ids["c1"]["kernel"] >= 0).all()


def test_equinox_units_are_rows():
  mlp = eqx.nn.MLP(12, 3, 7, depth=2, key=jax.random.key(0))
  params, static = eqx.partition(mlp, eqx.is_array)
  apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  groups = flipout.unit_groups(apply_fn, params, jnp.ones((2, 12)), kernel_layout="out_in")
  is_kernel = jax.tree.leaves(groups.kernels)
  kernels = [
      g for g, k in zip(jax.tree.leaves(groups.ids, is_leaf=lambda x: x is None), is_kernel) if k
  ]
  assert [g.shape for g in kernels] == [(7,), (7,), (3,)]
  # The two hidden biases follow their units; the output bias (the model's outputs) does not.
  assert sum(jax.tree.leaves(groups.where)) == 5
  np.testing.assert_array_equal(kernels[-1], -1)
  assert len(np.unique(np.concatenate(kernels[:2]))) == 14


def test_unit_groups_refuses_bad_arguments():
  apply_fn, params, images = _linen()
  with pytest.raises(TypeError, match="apply_fn"):
    flipout.unit_groups("model", params, images)
  with pytest.raises(ValueError, match="kernel_layout"):
    flipout.unit_groups(apply_fn, params, images, kernel_layout="io")
  with pytest.raises(ValueError, match=r"2\+ dimensions"):
    flipout.unit_groups(apply_fn, params, images, where=lambda path, leaf: True)


def test_pruned_units_are_what_compact_removes():
  apply_fn, params, images = _linen()
  groups = flipout.unit_groups(apply_fn, params, images)
  steps = 8
  tx = optax.chain(
      optax.sgd(0.05), flipout.prune(0.7, total_steps=steps, structure=flipout.units(groups))
  )
  state = tx.init(params)
  loss = lambda p: jnp.mean(apply_fn(p, images) ** 2)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  masks = flipout.masks(state)
  live = {
      name: np.asarray(masks[name]["kernel"]).reshape(-1, masks[name]["kernel"].shape[-1]).any(0)
      for name in ("stem", "c1", "c2", "hidden", "head")
  }
  np.testing.assert_array_equal(live["stem"], live["c2"])  # the stream goes channel by channel
  assert live["head"].all()
  assert not live["stem"].all() and not live["hidden"].all()
  compacted = flipout.compact(apply_fn, params, images)
  widths = {layer.name: layer.out_features for layer in compacted.report.layers}
  for name in ("stem", "c1", "c2", "hidden"):
    dense, compact = widths[f"['{name}']['kernel']"]
    assert compact <= live[name].sum() < dense, name
  np.testing.assert_allclose(
      compacted.apply(compacted.params, images), apply_fn(params, images), atol=1e-5
  )
