"""``compacted.apply`` at other batch sizes: the analysed program retraced, and refused when
anything but the batch axis's size changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout
from tests.test_compact import assert_same_outputs, inputs, mlp, pruned_mlp, same_conv, size


def test_compact_apply_jits_and_takes_other_batch_sizes():
  params = pruned_mlp()
  compacted = flipout.compact(mlp, params, inputs(count=3))
  assert size(compacted.params) < size(params)
  for count in (1, 7):
    x = inputs(count=count, seed=count)
    assert_same_outputs(mlp(params, x), compacted.apply(compacted.params, x))
    assert_same_outputs(mlp(params, x), jax.jit(compacted.apply)(compacted.params, x))


def test_compact_apply_refuses_arguments_that_add_an_axis():
  # Square weights: x of shape (2, 3, 3) traces to the same ops as (2, 3), on values whose
  # shapes extend the analysed ones by one axis. Only the batch axis's size may change.
  rng = np.random.default_rng(15)
  params = {"w1": rng.normal(size=(3, 3)).astype(np.float32), "w2": np.eye(3, dtype=np.float32)}
  params["w1"][:, 1] = 0.0
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  compacted = flipout.compact(apply_fn, params, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="another program"):
    compacted.apply(compacted.params, jnp.ones((2, 3, 3)))


@pytest.mark.parametrize("width", [3, 7])
def test_compact_apply_refuses_another_feature_width(width):
  # The summed features of x may be any number for apply_fn (here 5, then narrower or wider);
  # only the batch axis may change.
  rng = np.random.default_rng(21)
  params = {"w1": rng.normal(size=(1, 3)).astype(np.float32), "w2": np.eye(3, dtype=np.float32)}
  params["w1"][:, 1] = 0.0
  apply_fn = lambda p, x: jnp.tanh(jnp.sum(x, axis=1, keepdims=True) @ p["w1"]) @ p["w2"]
  compacted = flipout.compact(apply_fn, params, jnp.ones((2, 5)))
  assert compacted.params["w1"].shape == (1, 2)
  with pytest.raises(ValueError, match="another program"):
    compacted.apply(compacted.params, jnp.ones((2, width)))


def test_compact_apply_refuses_a_batch_size_that_reads_other_params():
  # Same ops at every batch size, but the second product reads w3 instead of w2 at size 4.
  rng = np.random.default_rng(22)
  params = {name: rng.normal(size=(3, 3)).astype(np.float32) for name in ("w1", "w2", "w3")}
  params["w1"][:, 1] = 0.0
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ (p["w2"] if x.shape[0] == 2 else p["w3"])
  compacted = flipout.compact(apply_fn, params, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="another program"):
    compacted.apply(compacted.params, jnp.ones((4, 3)))


def convs_then_flatten(params, x):
  h = jax.nn.relu(same_conv(x, params["conv1"]) + params["b1"])
  h = jax.nn.relu(same_conv(h, params["conv2"]) + params["b2"])
  return h.reshape(x.shape[0], -1) @ params["dense"] + params["b3"]


@pytest.mark.parametrize("constants", ["program", "params"])
def test_outputs_reached_only_through_the_flatten_of_an_empty_layer_take_other_batch_sizes(
    constants,
):
  # A trained VGG19 at 99.9% compacted to this in its second round: the last conv without
  # channels, flattened (batch, 1, 1, 0) -> (batch, 0). The reshape of an empty value pinned
  # every axis, so the outputs' batch axis was no longer the arguments', and apply refused
  # every other batch size (benchmarks.compaction on a GPU found it).
  rng = np.random.default_rng(5)
  params = {
      "conv1": rng.normal(size=(3, 3, 1, 2)).astype(np.float32),
      "b1": rng.normal(size=2).astype(np.float32),
      "conv2": np.zeros((3, 3, 2, 0), np.float32),
      "b2": np.zeros(0, np.float32),
      "dense": np.zeros((0, 4), np.float32),
      "b3": rng.normal(size=4).astype(np.float32),
  }
  compacted = flipout.compact(convs_then_flatten, params, inputs_nhwc(rng, 2), constants=constants)
  assert compacted.params["conv1"].shape == (3, 3, 1, 0)  # nothing reads conv1's channels
  for count in (1, 5):
    x = inputs_nhwc(rng, count)
    assert_same_outputs(convs_then_flatten(params, x), compacted.apply(compacted.params, x))


def inputs_nhwc(rng, count):
  return jnp.asarray(rng.normal(size=(count, 2, 2, 1)), jnp.float32)


def test_a_weakly_typed_param_takes_other_batch_sizes():
  # jnp.full((n,), 0.1) is weakly typed; a retrace with a strongly typed stand-in gave other
  # equations (a convert_element_type less), so apply refused every other batch size.
  rng = np.random.default_rng(23)
  w1 = rng.normal(size=(4, 6)).astype(np.float32)
  w1[:, :3] = 0.0
  params = {"w1": jnp.asarray(w1), "b1": jnp.full((6,), 0.1), "w2": jnp.ones((6, 2))}
  assert jax.typeof(params["b1"]).weak_type
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  compacted = flipout.compact(apply_fn, params, jnp.ones((3, 4)))
  assert compacted.params["w1"].shape == (4, 3)
  for count in (1, 5):
    x = jnp.asarray(rng.normal(size=(count, 4)), jnp.float32)
    assert_same_outputs(apply_fn(params, x), compacted.apply(compacted.params, x))
