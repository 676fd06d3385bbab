"""A misplaced prune is caught at the second update; skipped updates are no false alarm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import prune as prune_lib
from flipout_jax._src import update_check
from tests.test_transform import _data, _every_third_masks, _loss, _mlp_params


def _run(tx, grads_at, steps, apply_at=lambda step: True):
  """``steps`` eager updates; ``grads_at(step, params)`` gives the gradient of each step.

  Returns the params after each step and the final state. ``apply_at(step)`` False discards
  that step's update (params unchanged) but keeps its state.
  """
  params = _mlp_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for step in range(1, steps + 1):
    updates, state = update(grads_at(step, params), state, params)
    if apply_at(step):
      params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _loss_grads(step, params):
  del step
  return jax.grad(_loss)(params, *_data())


def _is_stopped(params) -> bool:
  return bool(np.all(np.isnan(np.asarray(params["hidden"]["kernel"]))))


def test_prune_before_the_optimizer_stops_at_the_second_update():
  # The first pruning event is at step 12: the old check would wait until step 13.
  tx = optax.chain(flipout.prune(0.9, total_steps=60), optax.sgd(0.1))
  history, state = _run(tx, _loss_grads, steps=3)
  assert not _is_stopped(history[0])
  assert _is_stopped(history[1]) and _is_stopped(history[2])
  with pytest.raises(ValueError, match=r"LAST in optax.chain.*not optax.chain\(flipout.prune"):
    flipout.masks(state)


def test_a_stopped_run_stays_stopped_when_the_params_stop_moving():
  # Stopped at update 2; then the same params twice: the second of those is a skipped step
  # by the sample and moves no pruned weight (no event yet), but the stopped count keeps it
  # NaN.
  tx = optax.chain(flipout.prune(0.9, total_steps=60), optax.sgd(0.1))
  params = _mlp_params()
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compilation for all four updates
  grads = _loss_grads(1, params)
  updates, state = update(grads, state, params)
  moved = optax.apply_updates(params, updates)
  updates, state = update(grads, state, moved)
  assert _is_stopped(optax.apply_updates(moved, updates))
  for step in (3, 4):
    updates, state = update(grads, state, params)
    assert _is_stopped(optax.apply_updates(params, updates)), step
  assert int(state[0].count) < 0


def test_params_changed_between_updates_stop_the_run():
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=60))
  params = _mlp_params()
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compilation for both updates
  updates, state = update(_loss_grads(1, params), state, params)
  params = optax.apply_updates(params, updates)
  params = jax.tree.map(lambda p: p * 0.5, params)  # e.g. a weight constraint applied by hand
  updates, state = update(_loss_grads(2, params), state, params)
  assert _is_stopped(optax.apply_updates(params, updates))
  with pytest.raises(ValueError, match="do not change params between tx.update calls"):
    flipout.flip_counts(state)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_correct_chain_never_stops(dtype):
  # bfloat16 params with float32 updates: the sample must round p + u as apply_updates does.
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=20))
  grads = lambda step, params: jax.tree.map(
      lambda g: g.astype(jnp.float32), _loss_grads(step, params)
  )
  params = jax.tree.map(lambda p: p.astype(dtype), _mlp_params())
  state = tx.init(params)
  for step in range(1, 31):
    updates, state = jax.jit(tx.update)(grads(step, params), state, params)
    params = optax.apply_updates(params, updates)
  assert int(state[-1].count) == 30 and not _is_stopped(params)


def test_a_step_skipped_by_apply_if_finite_is_no_alarm():
  inner = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.5, total_steps=10))
  tx = optax.apply_if_finite(inner, max_consecutive_errors=3)

  def grads(step, params):
    g = _loss_grads(step, params)
    return jax.tree.map(lambda x: x * jnp.nan, g) if step in (3, 7) else g

  history, state = _run(tx, grads, steps=12)
  assert int(state.total_notfinite) == 2
  assert not _is_stopped(history[-1])
  assert int(state.inner_state[-1].count) == 10  # the two skipped steps did not count
  flipout.masks(state)  # readable: the run was not stopped


def test_an_update_discarded_by_the_loop_is_no_alarm():
  # The state advanced but params did not move (a loop skipping a step): not a misplaced prune.
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.5, total_steps=10))
  history, state = _run(tx, _loss_grads, steps=8, apply_at=lambda step: step != 4)
  assert not _is_stopped(history[-1]) and int(state[-1].count) == 8


def test_multisteps_is_no_alarm():
  inner = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.5, total_steps=10))
  tx = optax.MultiSteps(inner, every_k_schedule=3)
  history, state = _run(tx, _loss_grads, steps=15)
  assert not _is_stopped(history[-1]) and int(state.inner_opt_state[-1].count) == 5


def test_a_diverged_run_is_not_called_a_misplaced_prune():
  # NaN gradients from step 4 on, through events, with no apply_if_finite: the params go NaN,
  # pruned ones too (-NaN is the update that keeps them at zero). That is divergence, which
  # the loop's finiteness check reports; telling the user to move prune would mislead.
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=10))

  def grads(step, params):
    g = _loss_grads(step, params)
    return jax.tree.map(lambda x: x * jnp.nan, g) if step >= 4 else g

  history, state = _run(tx, grads, steps=12)
  assert np.isnan(np.asarray(history[-1]["hidden"]["kernel"])).any()
  assert int(state[-1].count) == 12
  flipout.masks(state)  # readable: no "put prune last" error


def test_the_sample_is_a_few_kib_whatever_the_model_size():
  tx = flipout.prune(0.5, total_steps=10)
  big = {"a": jnp.zeros((1024, 1024)), "b": jnp.zeros((512, 256))}
  sample = tx.init(big).last_update
  nbytes = sum(x.nbytes for x in jax.tree.leaves(sample))
  assert nbytes <= 4096, nbytes


def test_the_sample_holds_at_most_its_size_for_leaves_that_its_stride_does_not_divide():
  # 1000 and 1073 entries: every 7th and 8th entry are more than the 128 each leaf may keep.
  tx = flipout.prune(0.5, total_steps=10)
  params = {"a": jnp.zeros((100, 10)), "b": jnp.zeros((37, 29))}
  sample = tx.init(params).last_update
  sizes = [x.size for x in sample.before]
  assert sum(sizes) <= update_check.SAMPLE_SIZE and min(sizes) >= 1, sizes
  assert [x.size for x in sample.after] == sizes


def test_a_state_without_a_sample_checks_nothing():
  # PruneState built with three fields (as before the sample existed) still trains.
  tx = optax.chain(flipout.prune(0.9, total_steps=60), optax.sgd(0.1))
  params = _mlp_params()
  state = tx.init(params)
  state = (state[0]._replace(last_update=None), *state[1:])
  update = jax.jit(tx.update)  # one compilation for both updates
  updates, state = update(_loss_grads(1, params), state, params)
  params = optax.apply_updates(params, updates)
  updates, state = update(_loss_grads(2, params), state, params)
  assert state[0].last_update is None and int(state[0].count) == 2


@pytest.mark.parametrize("ulps, stops", [(1, False), (-1, False), (64, True)])
def test_a_fused_multiply_add_rounding_is_no_alarm_but_a_larger_change_is(ulps, stops):
  # An accelerator may compute params + (-lr * m) as one fused multiply-add, rounding once:
  # the params then differ from the sample's params + update by an ulp.
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=60))
  params = _mlp_params()
  state = tx.init(params)
  updates, state = tx.update(_loss_grads(1, params), state, params)
  params = optax.apply_updates(params, updates)
  direction = np.inf if ulps > 0 else -np.inf

  def nudge(p):
    p = np.asarray(p)
    for _ in range(abs(ulps)):
      p = np.nextafter(p, np.float32(direction)).astype(p.dtype)
    return jnp.asarray(p)

  params = jax.tree.map(nudge, params)
  updates, state = tx.update(_loss_grads(2, params), state, params)
  assert _is_stopped(optax.apply_updates(params, updates)) == stops


_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    # eps 1e-8 is 0 in float16, where g**2 underflows too: adam's own update is then inf/NaN
    # at step 1, with or without prune. 1e-4 is the usual float16 choice.
    "adam": lambda: optax.adam(3e-3, eps=1e-4),
    "adamw": lambda: optax.adamw(3e-3, eps=1e-4, weight_decay=1e-2),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("optimizer", list(_OPTIMIZERS))
def test_a_whole_training_step_compiled_as_one_program_never_stops(optimizer, dtype):
  # The gradient, the optimizer, prune and apply_updates in one jitted scan: the compiler may
  # fuse the optimizer's scaling into params + update (an FMA on GPUs), and reorder the
  # arithmetic the sample repeats. A correct chain must train on through its events.
  tx = optax.chain(_OPTIMIZERS[optimizer](), flipout.prune(0.9, total_steps=150))
  x, y = _data()
  params = jax.tree.map(lambda p: p.astype(dtype), _mlp_params())

  def step(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: _loss(jax.tree.map(lambda w: w.astype(jnp.float32), p), x, y))(
        params
    )
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=200))(
      (params, tx.init(params))
  )
  assert int(state[-1].count) == 200 and not _is_stopped(params)
  assert flipout.sparsity(params) == pytest.approx(0.9, abs=0.01)


def _conv_loss(params, x, y):
  conv = lambda h, kernel: jax.lax.conv_general_dilated(
      h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jax.nn.relu(conv(jax.nn.relu(conv(x, params["c1"])), params["c2"]))
  logits = h.reshape(x.shape[0], -1) @ params["d"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_a_donated_training_step_copies_no_params_for_the_update_check():
  # The sample's reads of the params must come before the step overwrites them in place;
  # when nothing ordered them, XLA copied every prunable param whole, every step (VGG19 on
  # CPU: 1.024x of a dense step instead of 1.004x; BENCHMARKS section 4).
  rng = np.random.default_rng(0)
  params = {
      "c1": jnp.asarray(rng.normal(size=(3, 3, 3, 16)) * 0.2, jnp.float32),
      "c2": jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32),
      "d": jnp.asarray(rng.normal(size=(16 * 64, 10)) * 0.05, jnp.float32),
  }
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=100))
  x, y = jnp.ones((4, 8, 8, 3)), jnp.zeros(4, jnp.int32)

  def step(state):
    params, opt_state = state
    updates, opt_state = tx.update(jax.grad(_conv_loss)(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=0).lower((params, tx.init(params))).compile()
  entry = compiled.as_text().split("ENTRY", 1)[1]
  shapes = {f"f32[{','.join(map(str, p.shape))}]{{" for p in params.values()}
  copies = [
      line for line in entry.splitlines() if " copy(" in line and any(s in line for s in shapes)
  ]
  assert not copies, copies


@pytest.mark.parametrize("count_flips", [True, False])
def test_fixed_masks_before_the_optimizer_stops_at_the_second_update(count_flips):
  params = _mlp_params()
  masks = _every_third_masks(params)
  tx = optax.chain(flipout.fixed_masks(masks, count_flips=count_flips), optax.sgd(0.1))
  history, _ = _run(tx, _loss_grads, steps=2)
  assert not _is_stopped(history[0]) and _is_stopped(history[1])


def _nudge_from(first_step: int) -> optax.GradientTransformation:
  """Adds 1e-3 to every update from update ``first_step`` on: after prune, it moves pruned
  weights, but only from then."""

  def update(updates, count, params=None):
    del params
    nudge = jnp.where(count + 1 >= first_step, 1e-3, 0.0)
    return jax.tree.map(lambda u: u + nudge.astype(u.dtype), updates), count + 1

  return optax.GradientTransformation(lambda params: jnp.zeros([], jnp.int32), update)


def test_a_link_that_moves_pruned_weights_late_stops_the_run_at_the_next_check():
  # The checks run at sample steps and the update after them, not every step: a link after
  # prune that starts moving pruned weights at update 500 is found at update CHECK_EVERY + 1.
  params = _mlp_params()
  masks = _every_third_masks(params)
  tx = optax.chain(optax.sgd(0.01), flipout.fixed_masks(masks, count_flips=False), _nudge_from(500))
  state = tx.init(params)
  step_fn = jax.jit(lambda p, s, g: tx.update(g, s, p))
  grads = jax.grad(_loss)(params, *_data())
  stopped_at = None
  for step in range(1, prune_lib.CHECK_EVERY + 2):
    updates, state = step_fn(params, state, grads)
    params = optax.apply_updates(params, updates)
    if stopped_at is None and _is_stopped(params):
      stopped_at = step
  assert stopped_at == prune_lib.CHECK_EVERY + 1
