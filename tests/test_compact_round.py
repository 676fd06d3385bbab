"""Tests for ``flipout.compact(..., round_to=k)``: every width that shrinks is a multiple of
``k`` (removable units kept back), with the outputs of the dense function.

Models are the plain-jnp ones of tests/test_compact.py made wide enough (tens of units) for
pruning to leave widths that are not multiples of 8; outputs are compared with its tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout

from tests.test_compact import (
    assert_same_outputs,
    check_outputs,
    inputs,
    mlp,
    mlp_params,
    prune_tree,
    same_conv,
    shapes,
)


def shrunk_axes(params, compacted):
  """``(leaf path, axis, dense size, compact size)`` of every param axis compaction cut."""
  found = []
  dense = jax.tree_util.tree_leaves_with_path(params)
  for (path, leaf), small in zip(dense, jax.tree.leaves(compacted.params)):
    for axis, (before, after) in enumerate(zip(np.shape(leaf), np.shape(small))):
      if before != after:
        found.append((jax.tree_util.keystr(path), axis, before, after))
  return found


def assert_rounded(params, compacted, round_to):
  """Something shrank, and every param axis that shrank is a multiple of ``round_to``."""
  cut = shrunk_axes(params, compacted)
  assert cut, "nothing was compacted: the test model is too dense"
  assert [c for c in cut if c[3] % round_to] == [], cut


def wide_mlp():
  """(12 -> 50 -> 37 -> 5), half of each kernel and about a third of its units pruned: hidden
  widths of 22 and 16 compacted."""
  return prune_tree(mlp_params(seed=3, widths=(12, 50, 37, 5)), 0.5, seed=3, dead=0.3)


def test_an_mlps_hidden_widths_round_up_to_the_next_multiple():
  params, x = wide_mlp(), inputs(features=12)
  exact = flipout.compact(mlp, params, x)
  rounded = flipout.compact(mlp, params, x, round_to=8)
  assert_rounded(params, rounded, 8)
  # Each hidden unit is a unit of its own: rounding keeps back no more than it needs.
  for (path, axis, dense, width), (_, _, _, rounded_width) in zip(
      shrunk_axes(params, exact), shrunk_axes(params, rounded)
  ):
    assert rounded_width == min(-(-width // 8) * 8, dense), (path, axis)
  check_outputs(mlp, params, rounded, x)


def test_the_units_kept_back_are_the_lowest_removed_ones():
  params, x = wide_mlp(), inputs(features=12)
  exact = flipout.compact(mlp, params, x).kept["w1"][1]
  rounded = flipout.compact(mlp, params, x, round_to=8).kept["w1"][1]
  removed = np.setdiff1d(np.arange(50), exact)
  extra = np.setdiff1d(rounded, exact)
  np.testing.assert_array_equal(extra, removed[: extra.size])


def conv_dense(params, x):
  """conv3x3 -> relu -> conv3x3 -> relu -> flatten -> dense, on 4x4 images."""
  h = jax.nn.relu(same_conv(x, params["k1"]) + params["c1"])
  h = jax.nn.relu(same_conv(h, params["k2"]) + params["c2"])
  return h.reshape(h.shape[0], -1) @ params["w"] + params["b"]


def conv_dense_params():
  rng = np.random.default_rng(5)
  params = {
      "k1": rng.normal(size=(3, 3, 3, 20)).astype(np.float32),
      "c1": rng.normal(size=20).astype(np.float32),
      "k2": rng.normal(size=(3, 3, 20, 27)).astype(np.float32),
      "c2": rng.normal(size=27).astype(np.float32),
      "w": rng.normal(size=(4 * 4 * 27, 10)).astype(np.float32),
      "b": rng.normal(size=10).astype(np.float32),
  }
  # Whole channels and single flattened features go, and the kernels are sparse.
  return prune_tree(params, 0.9, seed=5, dead=0.3)


def images(count=3):
  return jax.random.normal(jax.random.key(4), (count, 4, 4, 3))


def test_a_conv_net_that_flattens_into_a_dense_layer_rounds_channels_and_features():
  params, x = conv_dense_params(), images()
  exact = flipout.compact(conv_dense, params, x)
  # The channels and the flattened features (rows of the dense kernel) both shrink.
  assert {(p, a) for p, a, _, w in shrunk_axes(params, exact) if w % 8} >= {
      ("['k2']", 3),
      ("['w']", 0),
  }
  rounded = flipout.compact(conv_dense, params, x, round_to=8)
  assert_rounded(params, rounded, 8)
  # The flattened features kept back are of channels that stay: no channel more than the
  # channels' own rounding keeps (a feature of a removed channel would keep the channel).
  for key in ("k1", "k2"):
    assert rounded.params[key].shape[3] == -(-exact.params[key].shape[3] // 8) * 8
  check_outputs(conv_dense, params, rounded, x)


def test_the_features_kept_back_are_of_channels_that_stay():
  params = conv_dense_params()
  params["k2"] = np.where(params["k2"] == 0, 0.3, params["k2"])  # every channel has inputs ...
  dead = [0, 2, 5, 7, 8, 11, 13, 14, 20, 22, 26]
  params["k2"][..., dead] = 0.0  # ... but these, which are the constant relu(-1) = 0
  params["c2"][dead] = -1.0
  x = images()
  exact = flipout.compact(conv_dense, params, x)
  assert exact.params["k2"].shape[3] == 16 and exact.params["w"].shape[0] % 8
  # Feature 0 (channel 0 at the first pixel) is the lowest removed one; keeping it back would
  # keep channel 0, and then 7 more channels to round that width up again.
  rounded = flipout.compact(conv_dense, params, x, round_to=8)
  assert rounded.params["k2"].shape[3] == 16
  assert_rounded(params, rounded, 8)
  check_outputs(conv_dense, params, rounded, x)


def residual_mlp(params, x):
  """A 64-wide stream that one hidden layer adds to: the stream's units are shared by the
  input projection, the block's two kernels and the head."""
  h = x @ params["w_in"]
  h = h + jax.nn.relu(h @ params["wa"] + params["ba"]) @ params["wb"]
  return h @ params["w_out"] + params["b_out"]


def residual_params():
  rng = np.random.default_rng(9)
  params = {
      "w_in": rng.normal(0, 0.3, (10, 64)).astype(np.float32),
      "wa": rng.normal(0, 0.2, (64, 45)).astype(np.float32),
      "ba": rng.normal(0, 0.5, 45).astype(np.float32),
      "wb": rng.normal(0, 0.2, (45, 64)).astype(np.float32),
      "w_out": rng.normal(0, 0.2, (64, 4)).astype(np.float32),
      "b_out": rng.normal(0, 0.5, 4).astype(np.float32),
  }
  params = prune_tree(params, 0.5, seed=9, dead=0.2)
  # Stream units 3, 17, ... get no input (from the projection nor the block) and are
  # constant 0; units 5, 40, ... are read by nothing (the block nor the head).
  for unit in (3, 17, 30, 44, 58):
    params["w_in"][:, unit] = params["wb"][:, unit] = 0.0
  for unit in (5, 40, 41, 62):
    params["wa"][unit] = params["w_out"][unit] = 0.0
  return params


def test_a_residual_streams_width_rounds_in_every_value_that_shares_it():
  params, x = residual_params(), inputs(features=10)
  exact = flipout.compact(residual_mlp, params, x)
  assert exact.params["w_in"].shape[1] % 8  # the stream shrinks, and not to a multiple
  rounded = flipout.compact(residual_mlp, params, x, round_to=8)
  assert_rounded(params, rounded, 8)
  stream = rounded.params["w_in"].shape[1]
  assert rounded.params["wb"].shape[1] == rounded.params["w_out"].shape[0] == stream
  check_outputs(residual_mlp, params, rounded, x)


def concatenated(params, x):
  """Two layers side by side, concatenated into a third."""
  both = [jnp.tanh(x @ params["wa"]), jnp.tanh(x @ params["wb"])]
  return jnp.concatenate(both, axis=1) @ params["w"]


def test_a_concatenation_with_a_whole_part_of_an_odd_width_is_kept_whole():
  # Part b keeps all of its 13 units, so the concatenation (a's width + 13) and part a can
  # both be multiples of 8 only when nothing goes: each unit the concatenation keeps back is
  # one of a's, which a then rounds again, until both are whole.
  rng = np.random.default_rng(3)
  params = {
      "wa": rng.normal(size=(6, 64)).astype(np.float32),
      "wb": rng.normal(size=(6, 13)).astype(np.float32),
      "w": rng.normal(size=(77, 3)).astype(np.float32),
  }
  params["w"][rng.permutation(64)[:34]] = 0.0  # part a: 30 of its 64 units read
  x = inputs()
  assert flipout.compact(concatenated, params, x).params["wa"].shape == (6, 30)
  rounded = flipout.compact(concatenated, params, x, round_to=8)
  assert shapes(rounded.params) == shapes(params)
  check_outputs(concatenated, params, rounded, x)


@pytest.mark.parametrize("constants", ["program", "params"])
def test_round_to_1_is_the_default(constants):
  params, x = wide_mlp(), inputs(features=12)
  default = flipout.compact(mlp, params, x, constants=constants)
  one = flipout.compact(mlp, params, x, constants=constants, round_to=1)
  assert shapes(one.params) == shapes(default.params)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(default.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(one.kept), jax.tree.leaves(default.kept)):
    np.testing.assert_array_equal(a, b)


def test_a_width_already_a_multiple_is_untouched():
  params, x = wide_mlp(), inputs(features=12)
  exact = flipout.compact(mlp, params, x)
  assert exact.params["w2"].shape[1] == 16  # hidden 2 compacts to a multiple of 8 ...
  rounded = flipout.compact(mlp, params, x, round_to=8)
  np.testing.assert_array_equal(rounded.kept["w2"][1], exact.kept["w2"][1])  # ... kept as is
  assert rounded.params["w1"].shape[1] != exact.params["w1"].shape[1]  # hidden 1 is not


def test_a_round_to_wider_than_a_layer_keeps_it_whole():
  params, x = wide_mlp(), inputs(features=12)
  compacted = flipout.compact(mlp, params, x, round_to=64)  # widths 50 and 37
  assert shapes(compacted.params) == shapes(params)
  check_outputs(mlp, params, compacted, x)


def test_a_layer_left_with_no_unit_stays_empty():
  params = mlp_params(seed=7, widths=(6, 20, 13, 3))
  params["w2"][:] = 0.0  # hidden 2 is the constant relu(b2): folded into the output's bias
  compacted = flipout.compact(mlp, params, inputs(), round_to=8)
  assert compacted.params["w3"].shape[0] == 0
  assert_rounded(params, compacted, 8)
  check_outputs(mlp, params, compacted, inputs())


@pytest.mark.parametrize("round_to", [0, -1, 2.5, "8", True])
def test_a_bad_round_to_is_rejected_naming_it(round_to):
  with pytest.raises(ValueError, match=r"round_to must be an int >= 1"):
    flipout.compact(mlp, mlp_params(), inputs(), round_to=round_to)


def test_rounded_outputs_match_at_another_batch_size_and_under_jit():
  params = residual_params()
  rounded = flipout.compact(residual_mlp, params, inputs(features=10), round_to=8)
  for x in (inputs(count=7, features=10, seed=2), inputs(count=1, features=10, seed=3)):
    expected = residual_mlp(params, x)
    assert_same_outputs(expected, rounded.apply(rounded.params, x))
    assert_same_outputs(expected, jax.jit(rounded.apply)(rounded.params, x))


def test_the_shrink_of_a_rounded_compaction_cuts_like_its_params():
  params, x = conv_dense_params(), images()
  rounded = flipout.compact(conv_dense, params, x, round_to=8)
  zeros = jax.tree.map(jnp.zeros_like, params)
  assert shapes(rounded.shrink(zeros)) == shapes(rounded.params)
