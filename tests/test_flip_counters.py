"""Flip counter storage: uint16 while every event reads counts <= 65535, exact, saturating after."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import flipout_jax as flipout
from experiments import checkpoints

_PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}


def _stored_dtype(tx):
  return jax.eval_shape(tx.init, _PARAMS).flips["w"].dtype


@pytest.mark.parametrize(
    "make,dtype",
    [
        # Target mode: one event at round(total_steps / 2).
        (lambda **kw: flipout.prune(0.5, total_steps=131_070, **kw), jnp.uint16),  # step 65535
        (lambda **kw: flipout.prune(0.5, total_steps=131_072, **kw), jnp.int32),  # step 65536
        # Rate mode: the last multiple of every before total_steps.
        (
            lambda **kw: flipout.prune(
                total_steps=65_536, schedule=flipout.halving(every=65_535), **kw
            ),
            jnp.uint16,
        ),
        (
            lambda **kw: flipout.prune(
                total_steps=65_537, schedule=flipout.halving(every=65_536), **kw
            ),
            jnp.int32,
        ),
        (
            lambda **kw: flipout.prune(schedule=flipout.halving(every=10), **kw),
            jnp.int32,
        ),  # no last event
        (
            lambda **kw: flipout.prune(0.9, schedule=flipout.cubic(1, 65_535, every=1000), **kw),
            jnp.uint16,
        ),
        (
            lambda **kw: flipout.prune(0.9, schedule=flipout.cubic(1, 65_536, every=1000), **kw),
            jnp.int32,
        ),
        (lambda: flipout.prune_below(0.1, step=65_535), jnp.uint16),
        (lambda: flipout.prune_below(0.1, step=65_536), jnp.int32),
        # No events: the counts only inform the user, so they stay exact.
        (lambda: flipout.fixed_masks({"w": jnp.ones((2, 3), bool), "b": None}), jnp.int32),
    ],
)
def test_counter_dtype_follows_the_last_event(make, dtype):
  assert _stored_dtype(make()) == dtype


def test_event_steps_of_the_boundary_cases():
  assert flipout.event_steps(0.5, 131_070) == (65_535,)
  assert flipout.event_steps(0.5, 131_072) == (65_536,)


@pytest.mark.parametrize("requested", ["int32", jnp.int32, np.dtype(np.int32)])
def test_int32_can_be_asked_for(requested):
  assert _stored_dtype(flipout.prune(0.5, total_steps=100, flip_count_dtype=requested)) == jnp.int32


def test_uint16_can_be_asked_for_when_it_is_exact():
  tx = flipout.prune(0.5, total_steps=100, flip_count_dtype=np.uint16)
  assert _stored_dtype(tx) == jnp.uint16


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(flip_count_dtype="int8"), ValueError, r"flip_count_dtype.*'uint16', 'int32'.*int8"),
        (dict(flip_count_dtype="float32"), ValueError, r"flip_count_dtype.*'uint16', 'int32'"),
        (dict(flip_count_dtype=object()), TypeError, r"flip_count_dtype.*'uint16', 'int32'"),
        (
            dict(total_steps=131_072, flip_count_dtype="uint16"),
            ValueError,
            r"flip_count_dtype='uint16'.*65535.*step 65536.*'int32'",
        ),
    ],
)
def test_bad_flip_count_dtype_is_refused_when_built(kwargs, error, match):
  kwargs = {"total_steps": 100, **kwargs}
  with pytest.raises(error, match=match):
    flipout.prune(0.5, **kwargs)


def test_uint16_without_a_last_event_is_refused():
  with pytest.raises(ValueError, match=r"flip_count_dtype='uint16'.*no last event"):
    flipout.prune(flip_count_dtype="uint16", schedule=flipout.halving(every=10))


def _step(tx, params, updates, count, flips):
  """One update from a state at ``count`` whose flip counts are ``flips``."""
  state = tx.init(params)
  stored = state.flips["w"].dtype
  state = state._replace(
      count=jnp.asarray(count, jnp.int32), flips={"w": jnp.asarray(flips, stored)}
  )
  new_updates, new_state = jax.jit(tx.update)(updates, state, params)
  return jax.tree.map(np.asarray, new_updates), new_state


@pytest.mark.parametrize("flip_count_dtype", ["uint16", "int32"])
def test_counts_saturate_instead_of_wrapping(flip_count_dtype):
  # After the run's only event (step 65535): weights 0 and 1 flip, weight 2 does not.
  top = int(np.iinfo(flip_count_dtype).max)
  tx = flipout.prune(0.5, total_steps=131_070, flip_count_dtype=flip_count_dtype)
  params = {"w": jnp.asarray([[-1.0, 1.0, -1.0]])}
  updates = {"w": jnp.asarray([[2.0, -2.0, 0.0]])}
  _, state = _step(tx, params, updates, count=70_000, flips=[[top - 1, top, 7]])
  np.testing.assert_array_equal(state.flips["w"], [[top, top, 7]])
  assert state.flips["w"].dtype == np.dtype(flip_count_dtype)
  read = flipout.flip_counts(state)["w"]
  assert read.dtype == jnp.int32
  np.testing.assert_array_equal(read, [[top, top, 7]])


def test_last_possible_event_reads_the_largest_count_exactly():
  # The event at step 65535 scores w_new = 1 for both weights; weight 0 flips at
  # that step, reaching 65535 flips, so |w|^2 / (65535 + 1) is the lowest score.
  # A count wrapped to 0 (or flips + 1 wrapped in uint16) would score it
  # 1 or inf and prune weight 1 instead.
  seen_dtypes = []

  def flipout_score(params, flips):
    seen_dtypes.extend(f.dtype for f in jax.tree.leaves(flips))
    return flipout.flipout_scores(params, flips)

  tx = flipout.prune(0.5, total_steps=131_070, criterion=flipout_score)
  params = {"w": jnp.asarray([[-1.0, 1.0]])}
  new_updates, state = _step(
      tx, params, {"w": jnp.asarray([[2.0, 0.0]])}, count=65_534, flips=[[65_534, 0]]
  )
  assert state.flips["w"].dtype == jnp.uint16
  assert seen_dtypes and all(d == jnp.int32 for d in seen_dtypes)
  np.testing.assert_array_equal(state.masks["w"], [[False, True]])
  np.testing.assert_array_equal(state.flips["w"], [[0, 0]])
  # The pruned weight lands on exactly 0; the live one keeps its update.
  np.testing.assert_array_equal(np.asarray(params["w"]) + new_updates["w"], [[0.0, 1.0]])


def test_a_checkpoint_with_int32_counts_resumes_into_uint16_counters(tmp_path):
  # Runs checkpointed before counters could be uint16 hold int32 counts; the
  # trainer restores into the state tx.init builds now. Counts past 65535 (a
  # run that went on after its last event) saturate, as uint16 counters do,
  # instead of wrapping.
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  counts = np.asarray([[0, 1, 65_535], [65_536, 70_000, 50_000]], np.int32)
  old = flipout.prune(0.5, total_steps=100, flip_count_dtype="int32").init(params)
  old = old._replace(flips={"w": jnp.asarray(counts), "b": None})
  manager = ocp.CheckpointManager(tmp_path.absolute())
  checkpoints.save(manager, 1, {"opt_state": old}, {"note": "int32 counts"})
  manager.wait_until_finished()
  target = {"opt_state": flipout.prune(0.5, total_steps=100).init(params)}
  restored, _ = checkpoints.restore(manager, 1, target)
  assert restored["opt_state"].flips["w"].dtype == jnp.uint16
  np.testing.assert_array_equal(
      flipout.flip_counts(restored["opt_state"])["w"], np.minimum(counts, 65_535)
  )


@pytest.mark.parametrize("flip_count_dtype", ["uint16", "int32"])
def test_odd_counts_count_up_by_one(flip_count_dtype):
  # Every weight flips once: an odd count must go up by one (a bitwise or would keep it).
  tx = flipout.prune(0.5, total_steps=131_070, flip_count_dtype=flip_count_dtype)
  params = {"w": jnp.asarray([[-1.0, 1.0, -1.0]])}
  updates = {"w": jnp.asarray([[2.0, -2.0, 2.0]])}
  _, state = _step(tx, params, updates, count=70_000, flips=[[1, 3, 6]])
  np.testing.assert_array_equal(state.flips["w"], [[2, 4, 7]])


@pytest.mark.parametrize(
    "kwargs",
    [dict(schedule=flipout.halving(every=10)), dict(target_sparsity=0.5, total_steps=131_072)],
)
def test_int32_can_be_asked_for_when_uint16_could_not_hold_the_counts(kwargs):
  # Only uint16 is refused there: int32 (wider, not "at least uint16") is allowed.
  tx = flipout.prune(flip_count_dtype="int32", **kwargs)
  assert _stored_dtype(tx) == jnp.int32


def test_a_short_schedule_counts_in_uint16_by_default():
  # Well below the 65535 boundary (which the cases above test at exactly 65535).
  assert _stored_dtype(flipout.prune(0.5, total_steps=100)) == jnp.uint16
