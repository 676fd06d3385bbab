"""Exact selection with keys recomputed in every counting pass (select.py), and its memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from benchmarks import memory
from flipout_jax._src import select
from tests import reference

_SPECIAL = np.asarray([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0, np.inf, -np.inf, np.nan], np.float32)


def _want(scores, live, k):
  """The NumPy reference: a stable argsort of the concatenated live scores."""
  flat = np.concatenate([np.ravel(s) for s in scores]).astype(np.float64)
  flat_live = np.concatenate([np.ravel(m) for m in live])
  want = np.zeros(flat.size, bool)
  want[reference._select_lowest(np.where(flat == 0, 0, flat), flat_live, k)] = True
  return want


# Jitted once at module level, k traced: the calls of a test (and the tests of the same
# shapes) reuse one compilation instead of compiling a fresh closure for every k.
@jax.jit
def _lazy_lowest_k_jitted(scores, live, k):
  keys = lambda: [select.sortable_keys(s, m) for s, m in zip(scores, live)]
  return select.lowest_k(keys, k)


def _lazy_lowest_k(scores, live, k):
  """lowest_k with keys given as a function (recomputed in every pass), jitted."""
  chosen = _lazy_lowest_k_jitted(scores, live, k)
  return np.concatenate([np.asarray(c).ravel() for c in chosen])


@pytest.mark.parametrize("seed", range(6))
def test_lazy_keys_match_the_reference_on_ties_zeros_and_non_finite_scores(seed):
  rng = np.random.default_rng(seed)
  shapes = [(7,), (3, 5), (2, 2, 3), (40,)]
  scores = [rng.choice(_SPECIAL, size=shape) for shape in shapes]  # mostly ties
  live = [rng.random(shape) < 0.8 for shape in shapes]
  total_live = sum(int(m.sum()) for m in live)
  for k in sorted({0, 1, total_live // 3, total_live // 2, total_live - 1, total_live}):
    k = max(k, 0)
    got = _lazy_lowest_k(scores, live, k)
    np.testing.assert_array_equal(got, _want(scores, live, k), err_msg=f"k={k}")
    assert got.sum() == k


def test_ties_are_cut_by_leaf_then_index_inside_a_later_leaf():
  # 10 equal scores in each of three leaves; k = 17 takes all of the first
  # leaf's ties and the first 7 of the second's, none of the third's.
  scores = [np.full((2, 5), 0.5, np.float32) for _ in range(3)]
  live = [np.ones((2, 5), bool) for _ in range(3)]
  got = _lazy_lowest_k(scores, live, 17)
  np.testing.assert_array_equal(got, [True] * 17 + [False] * 13)
  np.testing.assert_array_equal(got, _want(scores, live, 17))


def test_lazy_and_eager_keys_choose_the_same_weights():
  rng = np.random.default_rng(1)
  scores = [np.round(rng.normal(size=(33, 17)), 1).astype(np.float32), rng.normal(size=65)]
  scores[1] = scores[1].astype(np.float32)
  live = [rng.random(s.shape) < 0.7 for s in scores]
  k = 300
  eager = jax.jit(
      lambda s, m, k: select.lowest_k([select.sortable_keys(a, b) for a, b in zip(s, m)], k)
  )(scores, live, k)
  eager = np.concatenate([np.asarray(c).ravel() for c in eager])
  np.testing.assert_array_equal(_lazy_lowest_k(scores, live, k), eager)
  np.testing.assert_array_equal(eager, _want(scores, live, k))


def test_lazy_float64_keys_rank_with_float32_keys_exactly():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    wide = 1.0 + rng.integers(0, 30, 500) * 1e-12  # ties in float32 only
    narrow = np.round(1.0 + rng.normal(size=(20, 10)) * 1e-9, 12).astype(np.float32)
    live = [rng.random(wide.shape) < 0.9, rng.random(narrow.shape) < 0.9]
    for k in (0, 123, int(live[0].sum() + live[1].sum())):
      got = _lazy_lowest_k([wide, narrow], live, k)
      scores = np.concatenate([wide, narrow.ravel().astype(np.float64)])
      order = np.flatnonzero(np.concatenate([live[0], live[1].ravel()]))
      want = np.zeros(scores.size, bool)
      want[order[np.argsort(scores[order], kind="stable")[:k]]] = True
      np.testing.assert_array_equal(got, want)


# Rows of 32 (32, 4096), of another length from 16 to 32 that divides the size
# (31, 1000: 25, 30000: 30, 323: 19), or padded to rows of 32 (1, 33, 4099).
@pytest.mark.parametrize("size", [1, 31, 32, 33, 323, 1000, 4096, 4099, 30000])
def test_count_matches_numpy(size):
  mask = np.random.default_rng(size).random(size) < 0.4
  assert int(jax.jit(select.count)(mask)) == np.count_nonzero(mask)
  assert int(jax.jit(select.count)(mask.reshape(size, 1))) == np.count_nonzero(mask)


@pytest.mark.parametrize("size,padded", [(250_016, False), (250_000, False), (250_001, True)])
def test_counts_pad_only_sizes_without_a_row_length_from_16_to_32(size, padded):
  # A fused pad keeps XLA from vectorising the counting loop (a leaf of
  # 250,000 weights counted 6x slower than one of 250,016): 250,000 is rows
  # of 25; 250,001 = 53 * 53 * 89 has no divisor from 16 to 32.
  hlo = jax.jit(select.count).lower(jax.ShapeDtypeStruct((size,), jnp.bool_)).as_text()
  assert ("pad(" in hlo or "stablehlo.pad" in hlo) == padded


# ---------------------------------------------------------------------------
# Several thresholds per pass: counts packed into 6-bit fields of one sum.
# ---------------------------------------------------------------------------

_MAX32 = 2**32 - 1


@jax.jit
def _raw_lowest_k_jitted(keys, k):
  return select.lowest_k(lambda: keys, k)


def _raw_lowest_k(keys, k):
  """lowest_k on raw unsigned keys (any values, 0 and the maximum included), jitted."""
  chosen = _raw_lowest_k_jitted(keys, k)
  return np.concatenate([np.asarray(c).ravel() for c in chosen])


def _raw_want(keys, k):
  flat = np.concatenate([np.ravel(key) for key in keys])
  want = np.zeros(flat.size, bool)
  want[np.argsort(flat, kind="stable")[:k]] = True
  return want


# One compilation per key shapes, shared by the three fills of those shapes.
_count_at_most_each_int32 = jax.jit(lambda keys, t: select._count_at_most_each(keys, t, jnp.int32))


@pytest.mark.parametrize(
    "fill",
    [
        "zeros",  # every field counts 32 per row: a carry would reach the next field
        "maximum",  # no field counts anything but the last threshold's
        "boundaries",  # keys equal to each threshold and one either side
    ],
)
@pytest.mark.parametrize(
    "sizes", [(32,), (1,), (31, 33, 32 * 9 + 7), tuple(range(1, 40, 3)), (30000, 1000, 17 * 19)]
)
def test_packed_counts_match_numpy_for_each_threshold(fill, sizes):
  thresholds = np.asarray([0, 1, 1000, 2**31, _MAX32 - 1], np.uint32)
  rng = np.random.default_rng(len(sizes))
  if fill == "zeros":
    values = np.asarray([0], np.uint32)
  elif fill == "maximum":
    values = np.asarray([_MAX32], np.uint32)
  else:
    values = np.concatenate([thresholds, thresholds - 1, thresholds + 1]).astype(np.uint32)
  keys = [rng.choice(values, size) for size in sizes]
  got = _count_at_most_each_int32(keys, jnp.asarray(thresholds))
  flat = np.concatenate(keys)
  np.testing.assert_array_equal(got, [np.count_nonzero(flat <= t) for t in thresholds])


@pytest.mark.parametrize("key_type,dtype", [(np.uint64, jnp.int32), (np.uint32, jnp.int64)])
def test_packed_counts_fill_ten_fields_of_an_int64_under_x64(key_type, dtype):
  # uint64 keys, or int64 counts (2**31 weights or more), pack into an int64.
  with jax.enable_x64(True):
    assert select._fields(select._pack_type(key_type, dtype)) == 10
    rng = np.random.default_rng(7)
    top = np.iinfo(key_type).max
    thresholds = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, top // 3, top // 2, top - 2, top - 1, top]
    thresholds = np.asarray(thresholds, key_type)
    keys = [rng.choice(thresholds, 32 * 20 + 3), np.zeros(64, key_type)]
    got = jax.jit(lambda keys, t: select._count_at_most_each(keys, t, dtype))(
        keys, jnp.asarray(thresholds)
    )
    assert got.dtype == dtype
    flat = np.concatenate(keys)
    np.testing.assert_array_equal(got, [np.count_nonzero(flat <= t) for t in thresholds])


@pytest.mark.parametrize(
    "case",
    ["all_equal", "zero_and_maximum", "two_values", "random", "clustered", "many_leaves"],
)
def test_raw_uint32_keys_match_a_stable_sort_for_every_k(case):
  rng = np.random.default_rng(3)
  sizes = (45, 1, 32 * 3 + 5)
  if case == "all_equal":
    keys = [np.full(size, 12345, np.uint32) for size in sizes]
  elif case == "zero_and_maximum":
    keys = [rng.choice(np.asarray([0, 1, _MAX32 - 1, _MAX32], np.uint32), s) for s in sizes]
  elif case == "two_values":  # neighbours: only the last pass tells them apart
    keys = [rng.choice(np.asarray([2**31 - 1, 2**31], np.uint32), s) for s in sizes]
  elif case == "random":
    keys = [rng.integers(0, 2**32, s, dtype=np.uint32) for s in sizes]
  elif case == "clustered":  # values around the first few thresholds of a pass
    centres = np.asarray([_MAX32 // 6, _MAX32 // 3, _MAX32 // 2], np.int64)
    keys = [(rng.choice(centres, s) + rng.integers(-2, 3, s)).astype(np.uint32) for s in sizes]
  else:
    keys = [rng.integers(0, 50, s, dtype=np.uint32) for s in range(1, 70, 4)]
  total = sum(key.size for key in keys)
  for k in sorted({0, 1, 2, total // 7, total // 2, total - 1, total}):
    got = _raw_lowest_k(keys, k)
    np.testing.assert_array_equal(got, _raw_want(keys, k), err_msg=f"k={k}")


def test_raw_uint64_keys_match_a_stable_sort_under_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    top = 2**64 - 1
    values = np.asarray([0, 1, 2**32 - 1, 2**32, 2**63, top - 1, top], np.uint64)
    keys = [rng.choice(values, 70), rng.integers(0, 2**64, 33, dtype=np.uint64)]
    total = sum(key.size for key in keys)
    for k in (0, 1, 20, 50, 69, 70, 71, total - 1, total):
      np.testing.assert_array_equal(_raw_lowest_k(keys, k), _raw_want(keys, k), err_msg=f"k={k}")


@pytest.mark.parametrize("dtype,passes", [(np.uint32, 13), (np.uint64, 19)])
def test_the_key_search_takes_ceil_bits_over_log2_6_or_11_passes(dtype, passes):
  # The keys function runs once per counting pass, and the positional search
  # never runs: the keys are distinct and k >= 1 takes all of the threshold's
  # (k = 0 takes none of the lowest key's, which that search settles). A
  # bisection took 32 or 64.
  calls = []

  def run(keys, k):
    def compute():
      jax.debug.callback(lambda: calls.append(1))
      return [keys]

    return select.lowest_k_cut(compute, k)

  with jax.enable_x64(dtype == np.uint64):
    bits = np.iinfo(dtype).bits
    keys = np.asarray([0, 1, 2**bits // 3, 2**bits - 2, 2**bits - 1], dtype)
    run_jitted = jax.jit(run)  # k is traced: one compilation for every k
    for k in range(1, keys.size + 1):
      calls.clear()
      cut = run_jitted(keys, k)
      jax.effects_barrier()
      assert len(calls) <= passes, k
      assert int(cut.position) == keys.size
      assert int(cut.threshold) == keys[k - 1]


def test_each_counting_pass_is_one_loop_that_computes_the_keys_once():
  # One fused reduction per leaf per pass: the packed sum of one leaf is not
  # split into several loops (which would each recompute the score), and no
  # score, key or packed value per weight is written (only the row sums).
  size = 2**17

  def event(weights, flips, k):
    keys = lambda: [select.sortable_keys(jnp.abs(weights) / (1.0 + flips), True)]
    return select.lowest_k_cut(keys, k)

  weights = jax.ShapeDtypeStruct((size,), jnp.float32)
  compiled = jax.jit(event).lower(weights, weights, 7).compile()
  lines = compiled.as_text().splitlines()
  # One division and one row sum in the key search's pass, one of each in
  # the positional search's.
  divisions = [line for line in lines if " divide(" in line and f"[{size}]" in line]
  assert len(divisions) == 2, "\n".join(divisions)
  row_sums = [line for line in lines if f"[{size // 32}]{{0}} reduce(" in line]
  assert len(row_sums) == 2, "\n".join(row_sums)
  # Row sums (1/8 byte per weight) and their fields are all the scratch.
  assert compiled.memory_analysis().temp_size_in_bytes < size / 4


# ---------------------------------------------------------------------------
# Memory: XLA's analysis of the compiled step is deterministic (no timing).
# ---------------------------------------------------------------------------

_WIDTH = 1024  # four 1024 x 1024 kernels: 4M prunable weights, activations negligible


def _params():
  shape = jax.ShapeDtypeStruct((_WIDTH, _WIDTH), jnp.float32)
  bias = jax.ShapeDtypeStruct((_WIDTH,), jnp.float32)
  return {f"layer{i}": {"kernel": shape, "bias": bias} for i in range(4)}


@functools.cache
def _dense_peak_bytes() -> int:
  """The peak of the step without prune, the same for every parametrisation: compiled once."""
  return _peak_bytes(optax.sgd(0.1, momentum=0.9))


def _peak_bytes(tx) -> int:
  def loss(params, x):
    for i in range(4):
      layer = params[f"layer{i}"]
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return jnp.mean(x**2)

  def step(state, x):
    params, opt_state = state
    updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = _params()
  state = (params, jax.eval_shape(tx.init, params))
  x = jax.ShapeDtypeStruct((8, _WIDTH), jnp.float32)
  compiled = jax.jit(step, donate_argnums=0).lower(state, x).compile()
  return memory.step_peak_bytes(compiled.memory_analysis())


@pytest.mark.parametrize(
    "criterion,scratch", [("flipout", 6.5), ("magnitude", 4.0), ("random", 12.5)]
)
@pytest.mark.parametrize("flip_count_dtype,state", [("uint16", 3.0), ("int32", 5.0)])
def test_prune_adds_little_more_than_its_state_to_the_step_peak(
    criterion, scratch, flip_count_dtype, state
):
  # Bytes per prunable weight that prune adds to the compiled step's peak:
  # the state (an argument: a bool mask and a uint16 or int32 flip counter),
  # plus the updates of the prunable leaves, which the event branch reads and
  # XLA therefore writes out (at most 4 bytes; in conv nets they fit under the
  # activations and cost nothing). The event recomputes each leaf's keys
  # inside every counting pass and the steady path writes masks and flip
  # counts in place, with no copy of the params or of the counts converted to
  # int32. Before (all keys, scores and new weights held by the event branch,
  # a copy of the flip counts) this was 24, 20 and 20 with int32 counters.
  # The random criterion's threefry draws keep about 5 bytes of scratch per
  # weight of their own. Criteria that read the flip counts (flipout, random)
  # get them as an operand of the event's conditional (so the steady step reads
  # each count once, issue 33), and XLA hoists float32 (flips + 1) out of the
  # selection's loops: about 3 bytes more at events. In conv nets this fits
  # under the activations (VGG19 batch 32: peak unchanged, 1.237x dense).
  sgd = optax.sgd(0.1, momentum=0.9)
  weights = 4 * _WIDTH * _WIDTH
  dense = _dense_peak_bytes()
  tx = flipout.prune(0.9, total_steps=100, criterion=criterion, flip_count_dtype=flip_count_dtype)
  pruned = _peak_bytes(optax.chain(sgd, tx))
  assert state <= (pruned - dense) / weights <= state + scratch
