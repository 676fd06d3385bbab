"""Structured pruning (structure="unit" and "N:M") against the NumPy reference, bit for bit.

The reference (tests/reference.py) scores groups in float64 with a plain sum, ranks them
with a stable sort and takes N of M by a lexicographic sort; the library does neither.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import select
from flipout_jax._src import structure as structure_lib
from tests import reference

# Kernels whose input axes (-2) are multiples of 8, so every N:M below divides them.
SHAPES = {"conv": (3, 3, 8, 6), "dense": (16, 12), "head": (24, 4)}


def _kernels(seed, shapes=SHAPES, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      name: (scale * rng.normal(size=shape)).astype(np.float32) for name, shape in shapes.items()
  }


def _compare(tx, steps, shapes=SHAPES, seed=0, **kwargs):
  """Runs ``tx`` and the reference on the same updates; masks and weights equal each step."""
  params = _kernels(seed, shapes)
  updates = [_kernels(seed + 100 + t, shapes, scale=0.6) for t in range(steps)]
  names = sorted(shapes)
  listed = lambda tree: [np.asarray(tree[name]) for name in names]
  expected = reference.simulate(listed(params), [listed(u) for u in updates], **kwargs)
  state = tx.init(params)
  step_fn = jax.jit(tx.update)
  for step, (u, (want_w, want_m, want_f)) in enumerate(zip(updates, expected), start=1):
    new_updates, state = step_fn(u, state, params)
    params = optax.apply_updates(params, new_updates)
    for got, want in zip(listed(flipout.masks(state)), want_m):
      np.testing.assert_array_equal(got, want, err_msg=f"masks at step {step}")
    for got, want in zip(listed(params), want_w):
      np.testing.assert_array_equal(got, want, err_msg=f"weights at step {step}")
    for got, want in zip(listed(flipout.flip_counts(state)), want_f):
      np.testing.assert_array_equal(got, want, err_msg=f"flips at step {step}")
  return listed(flipout.masks(state))


CRITERIA = ["flipout", "global_magnitude", "magnitude", "random"]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("group_score", ["mean", "sum"])
def test_units_match_the_reference(criterion, group_score):
  tx = flipout.prune(
      0.9, total_steps=12, criterion=criterion, structure=flipout.units(score=group_score)
  )
  masks = _compare(
      tx,
      12,
      target=0.9,
      total_steps=12,
      criterion=criterion,
      structure="unit",
      group_score=group_score,
  )
  for mask in masks:  # whole columns only, and every leaf keeps a unit (min_units=1)
    columns = mask.reshape(-1, mask.shape[-1])
    assert (columns.all(axis=0) | ~columns.any(axis=0)).all()
    assert columns.any(axis=0).sum() >= 1


@pytest.mark.parametrize("criterion", ["flipout", "magnitude"])
def test_single_weights_match_the_reference_across_events(criterion):
  # structure="weight", the default beside the structures: 0.75 takes 2 events (steps 2 and
  # 4), and the second prunes only the difference to what the first left pruned.
  masks = _compare(
      flipout.prune(0.75, total_steps=6, criterion=criterion),
      6,
      target=0.75,
      total_steps=6,
      criterion=criterion,
  )
  pruned = sum(int((~mask).sum()) for mask in masks)
  assert pruned == 0.75 * sum(mask.size for mask in masks)


def test_unit_groups_of_a_dense_stack_in_the_default_layout():
  # (in, out) kernels: each of the hidden layer's units is a group, the outputs are -1.
  hidden, outputs = 5, 3
  params = {"a": np.ones((4, hidden), np.float32), "b": np.ones((hidden, outputs), np.float32)}
  apply_fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
  groups = flipout.unit_groups(apply_fn, params, jnp.ones((2, 4)))
  np.testing.assert_array_equal(groups.ids["a"], np.arange(hidden))
  np.testing.assert_array_equal(groups.ids["b"], np.full(outputs, -1))


def test_units_reach_at_least_the_target_with_the_fewest_groups():
  masks = _compare(
      flipout.prune(0.5, total_steps=4, structure="unit", criterion="global_magnitude"),
      4,
      target=0.5,
      total_steps=4,
      criterion="global_magnitude",
      structure="unit",
  )
  size = sum(np.prod(s) for s in SHAPES.values())
  pruned = sum(int((~m).sum()) for m in masks)
  assert pruned >= round(0.5 * size)
  # One unit fewer would not reach it: the largest pruned unit is more than the excess.
  largest = max(m.reshape(-1, m.shape[-1]).shape[0] for m in masks if (~m).any())
  assert pruned - largest < round(0.5 * size)


@pytest.mark.parametrize("min_units", [0, 2])
def test_min_units_per_layer(min_units):
  tx = flipout.prune(0.99, total_steps=10, structure=flipout.units(min_units=min_units))
  masks = _compare(tx, 10, target=0.99, total_steps=10, structure="unit", min_units=min_units)
  live_units = [int(m.reshape(-1, m.shape[-1]).any(axis=0).sum()) for m in masks]
  if min_units == 0:
    assert min(live_units) == 0  # 99% of the weights: some layer is emptied
  else:
    assert min(live_units) == min_units


def test_coupled_groups_go_together_and_minus_one_is_never_pruned():
  # conv's 6 units are coupled with the first 6 of dense's 12 (a residual add would do
  # this); head's 4 units are outputs of the model.
  groups = {"conv": np.arange(6), "dense": np.arange(12), "head": np.full(4, -1)}
  tx = flipout.prune(0.8, total_steps=10, structure=flipout.units(groups))
  masks = _compare(
      tx,
      10,
      target=0.8,
      total_steps=10,
      structure="unit",
      groups=[groups[name] for name in sorted(SHAPES)],
  )
  conv, dense, head = masks
  conv_units = conv.reshape(-1, 6).any(axis=0)
  np.testing.assert_array_equal(conv_units, dense.any(axis=0)[:6])
  assert head.all()
  assert not conv_units.all()


def test_equinox_layout_prunes_rows():
  shapes = {"a": (12, 16), "b": (4, 12)}  # (out, in)
  tx = flipout.prune(0.6, total_steps=6, structure=flipout.units(kernel_layout="out_in"))
  masks = _compare(
      tx, 6, shapes=shapes, target=0.6, total_steps=6, structure="unit", output_axes=[0, 0]
  )
  for mask in masks:
    assert (mask.all(axis=1) | ~mask.any(axis=1)).all()


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_n_of_m_matches_the_reference(criterion, n, m):
  tx = flipout.prune(total_steps=12, structure=f"{n}:{m}", criterion=criterion)
  masks = _compare(tx, 12, target=1 - n / m, total_steps=12, criterion=criterion, structure=(n, m))
  for mask in masks:
    runs = np.moveaxis(mask, -2, -1).reshape(-1, m)
    np.testing.assert_array_equal(runs.sum(axis=1), n)


def test_n_of_m_reaches_its_sparsity_through_the_cubic_ramp():
  tx = flipout.prune(
      total_steps=20, structure="2:8", schedule=flipout.cubic(begin_step=2, end_step=14, every=4)
  )
  params = _kernels(0)
  state = tx.init(params)
  step_fn = jax.jit(tx.update)
  live_per_run = []
  for t in range(20):
    updates, state = step_fn(_kernels(t + 1, scale=0.1), state, params)
    params = optax.apply_updates(params, updates)
    mask = np.asarray(flipout.masks(state)["dense"])
    live_per_run.append(int(np.moveaxis(mask, -2, -1).reshape(-1, 8).sum(axis=1).max()))
  assert live_per_run[-1] == 2
  assert live_per_run == sorted(live_per_run, reverse=True)
  assert len(set(live_per_run)) > 2  # several events on the way, not one jump


def test_n_of_m_along_the_equinox_input_axis():
  shapes = {"a": (6, 8), "b": (3, 12)}  # (out, in): the input axis is 1
  tx = flipout.prune(total_steps=6, structure=flipout.n_of_m(1, 4, kernel_layout="out_in"))
  masks = _compare(
      tx, 6, shapes=shapes, target=0.75, total_steps=6, structure=(1, 4), input_axes=[1, 1]
  )
  for mask in masks:
    np.testing.assert_array_equal(mask.reshape(mask.shape[0], -1, 4).sum(axis=2), 1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_n_of_m_takes_its_own_sparsity_as_the_target(n, m):
  # 1 - N/M is the one target N:M allows (the refused ones are below); builds, and is kept.
  flipout.prune(1 - n / m, total_steps=10, structure=f"{n}:{m}")
  structure = structure_lib.parse(f"{n}:{m}")
  assert structure_lib.check_n_of_m_target(structure, 1 - n / m) == 1 - n / m


def _init(tx, shapes=SHAPES):
  return tx.init(_kernels(0, shapes))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"structure": 4}, TypeError, "structure must be 'weight', 'unit', 'N:M'"),
        ({"structure": "units"}, ValueError, "'weight', 'unit', 'N:M' with integers"),
        ({"structure": "4:4"}, ValueError, "0 < N < M"),
        ({"structure": "0:4"}, ValueError, "0 < N < M"),
        ({"structure": "2:4", "target_sparsity": 0.9}, ValueError, "target_sparsity"),
        ({"structure": "unit", "group_score": "max"}, TypeError, r"write structure=flipout.units"),
    ],
)
def test_arguments_are_refused_when_built(kwargs, error, match):
  kwargs = {"target_sparsity": 0.5, **kwargs} if "target_sparsity" not in kwargs else kwargs
  with pytest.raises(error, match=match):
    flipout.prune(total_steps=10, **kwargs)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: flipout.units(score="max"), ValueError, "score must be one of"),
        (lambda: flipout.units(min_units=True), TypeError, "min_units"),
        (lambda: flipout.units(kernel_layout=3), TypeError, "kernel_layout"),
        (lambda: flipout.n_of_m(0, 4), ValueError, "0 < n < m"),
        (lambda: flipout.n_of_m(2, 4, kernel_layout="oi"), ValueError, "kernel_layout"),
    ],
)
def test_structure_values_are_refused_when_built(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_an_axis_not_a_multiple_of_m_is_refused_at_init():
  with pytest.raises(
      ValueError, match=r"\['conv'\], shape \(3, 3, 8, 6\), is not a multiple of M=16"
  ):
    _init(flipout.prune(total_steps=10, structure="2:16"))


@pytest.mark.parametrize(
    "groups, match",
    [
        ({"conv": np.arange(6), "dense": np.arange(11), "head": np.arange(4)}, r"shape \(12,\)"),
        ({"conv": np.arange(6), "dense": np.arange(12), "head": np.full(4, -2)}, "-1"),
        ({"conv": np.arange(6.0), "dense": np.arange(12), "head": np.arange(4)}, "int array"),
    ],
)
def test_bad_groups_are_refused_at_init(groups, match):
  with pytest.raises(ValueError, match=match):
    _init(flipout.prune(0.5, total_steps=10, structure=flipout.units(groups)))


def test_layerwise_magnitude_refuses_groups_across_layers():
  groups = {"conv": np.arange(6), "dense": np.arange(12), "head": np.arange(4)}
  tx = flipout.prune(0.5, total_steps=10, criterion="magnitude", structure=flipout.units(groups))
  with pytest.raises(ValueError, match="couples units"):
    _init(tx)


def test_a_one_dimensional_prunable_leaf_is_refused_for_units():
  params = {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)}
  tx = flipout.prune(0.5, total_steps=10, structure="unit", where=lambda path, leaf: True)
  with pytest.raises(ValueError, match=r"2\+ dimensions.*\['b'\]"):
    tx.init(params)


def test_group_sums_do_not_depend_on_the_order_of_the_weights():
  rng = np.random.default_rng(0)
  scores = (rng.random((300, 5)) * 10.0 ** rng.integers(-12, 2, (300, 5))).astype(np.float32)
  ids = [np.array([0, 1, 2, 3, 4])]
  bits = structure_lib.limb_bits(300)
  sums, bad = structure_lib.exact_group_sums([jnp.asarray(scores)], ids, 5, bits)
  shuffled, _ = structure_lib.exact_group_sums(
      [jnp.asarray(scores[rng.permutation(300)])], ids, 5, bits
  )
  np.testing.assert_array_equal(np.asarray(sums), np.asarray(shuffled))
  np.testing.assert_allclose(sums, scores.astype(np.float64).sum(axis=0), rtol=3e-7)
  assert not np.asarray(bad).any()


@pytest.mark.parametrize("group_size", [1, 7, 100, 5000])
def test_group_sums_of_groups_at_their_largest_score_do_not_overflow(group_size):
  # Every weight at the group's largest score puts every limb digit at its maximum, 2**bits:
  # limb_bits must leave the group's digit sums inside an int32.
  scores = jnp.full((group_size, 2), 0.75, jnp.float32)
  bits = structure_lib.limb_bits(group_size)
  sums, bad = structure_lib.exact_group_sums([scores], [np.array([0, 1])], 2, bits)
  np.testing.assert_array_equal(np.asarray(sums), [0.75 * group_size] * 2)
  assert not np.asarray(bad).any()


def test_group_sums_join_units_of_several_leaves_and_flag_non_finite_scores():
  first = jnp.array([[1.0, 2.0], [3.0, jnp.nan]])
  second = jnp.array([[0.5, 0.25, 7.0]])
  ids = [np.array([0, 1]), np.array([1, 0, 3])]  # 3: in no group of num_groups=3
  sums, bad = structure_lib.exact_group_sums([first, second], ids, 3, 20)
  np.testing.assert_allclose(sums, [4.25, 2.5, 0.0])
  np.testing.assert_array_equal(bad, [False, True, False])


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    keys=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    data=st.data(),
)
def test_lowest_reaching_is_a_stable_sorted_prefix(keys, data):
  weights = data.draw(st.lists(st.integers(0, 5), min_size=len(keys), max_size=len(keys)))
  dead = data.draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)))
  need = data.draw(st.integers(-2, sum(weights) + 3))
  as_keys = np.where(dead, np.iinfo(np.uint32).max, np.asarray(keys)).astype(np.uint32)
  got = np.asarray(structure_lib.lowest_reaching(jnp.asarray(as_keys), jnp.asarray(weights), need))
  want = np.zeros(len(keys), bool)
  if need > 0:
    order = [i for i in np.argsort(keys, kind="stable") if not dead[i]]
    total = 0
    for i in order:
      if total >= need:
        break
      want[i], total = True, total + weights[i]
  np.testing.assert_array_equal(got, want)


def test_keys_of_the_pruned_are_never_chosen():
  pruned = select.sortable_keys(jnp.array([1.0, 2.0]), jnp.array([False, True]))
  got = structure_lib.lowest_reaching(pruned, jnp.array([5, 5]), 100)
  np.testing.assert_array_equal(got, [False, True])


@pytest.mark.parametrize("pruned_per_run", [1, 2, 3])
def test_n_of_m_breaks_ties_by_position_and_prunes_the_dead_first(pruned_per_run):
  rng = np.random.default_rng(pruned_per_run)
  scores = rng.integers(0, 3, (5, 16, 3)).astype(np.float32)  # many ties
  live = rng.random((5, 16, 3)) < 0.8
  got = structure_lib.keep_n_of_m(jnp.asarray(scores), jnp.asarray(live), 1, 4, pruned_per_run)
  want = reference._n_of_m_masks([scores], [live], [1], 4 - pruned_per_run, 4, 1, 1)[0]
  # The reference rounds wanted/size * m: 1/1 * 4 = 4 per run, capped at m - n.
  np.testing.assert_array_equal(np.asarray(got), want)


def test_n_of_m_steady_update_keeps_the_masks_in_their_layout():
  # The event's masks come out of a lax.cond, whose result layout XLA picks from both
  # branches: a transposed mask from the N:M event made every step copy each mask into a
  # transposed layout and back (twice the steady update's time on CPU).
  params = {"kernel": jnp.ones((16, 12)), "second": jnp.ones((12, 8))}
  tx = flipout.prune(structure="2:4", total_steps=10)
  compiled = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  assert "transpose(" not in compiled
