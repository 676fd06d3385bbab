"""A damaged newest checkpoint (truncated, bit-flipped) is set aside with a warning, never
deleted, and ``--resume`` continues from the previous one to the same end as a run that was
never damaged."""

import shutil

import pytest

from experiments import checkpoints, mnist
from tests import saved_runs

_RUN = saved_runs.TINY_FLIPOUT_RUN  # checkpoints every epoch, keeps 3 (the defaults)


def _largest_state_file(checkpoint):
  return max(
      (path for path in (checkpoint / "state").rglob("*") if path.is_file()),
      key=lambda path: path.stat().st_size,
  )


def _truncate_metadata(checkpoint):
  path = checkpoint / "metadata" / "metadata"
  path.write_bytes(path.read_bytes()[:40])


def _truncate_state(checkpoint):
  path = _largest_state_file(checkpoint)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_state_bit(checkpoint):
  path = _largest_state_file(checkpoint)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _flip_a_metadata_digit(checkpoint):
  # Valid JSON still, but another epoch: only the checksum can tell.
  path = checkpoint / "metadata" / "metadata"
  text = path.read_text()
  assert '"epoch": 3' in text
  path.write_text(text.replace('"epoch": 3', '"epoch": 2', 1))


@pytest.mark.parametrize(
    "damage", [_truncate_metadata, _truncate_state, _flip_a_state_bit, _flip_a_metadata_digit]
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_flipout_run, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_flipout_run, workdir)
  newest = workdir / "checkpoints" / "3"
  damage(newest)
  damaged_files = {
      path.relative_to(newest): path.read_bytes() for path in newest.rglob("*") if path.is_file()
  }
  with pytest.warns(UserWarning, match=r"checkpoint .*checkpoints/3 is damaged"):
    assert mnist.main([*_RUN, f"--workdir={workdir}", "--resume"]) == 0
  # Kept, byte for byte, out of orbax's way; epoch 3 was trained again from epoch 2.
  kept = workdir / checkpoints.DAMAGED_DIR / "epoch-3"
  assert {
      path.relative_to(kept): path.read_bytes() for path in kept.rglob("*") if path.is_file()
  } == damaged_files
  assert checkpoints.load_run(workdir).epoch == 3
  saved_runs.assert_same_final_arrays(tiny_flipout_run, workdir)


def test_every_checkpoint_damaged_is_one_line(tiny_flipout_run, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_flipout_run, workdir)
  for checkpoint in (workdir / "checkpoints").iterdir():
    if checkpoint.name.isdigit():
      _truncate_state(checkpoint)
  with pytest.warns(UserWarning, match="is damaged"):
    assert mnist.main([*_RUN, f"--workdir={workdir}", "--resume"]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "every checkpoint of" in err, err
  assert sorted(path.name for path in (workdir / checkpoints.DAMAGED_DIR).iterdir()) == [
      "epoch-1",
      "epoch-2",
      "epoch-3",
  ]


def test_load_run_of_a_bit_flipped_checkpoint_is_a_damaged_checkpoint_error(
    tiny_flipout_run, tmp_path
):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_flipout_run, workdir)
  _flip_a_metadata_digit(workdir / "checkpoints" / "3")
  with pytest.raises(checkpoints.DamagedCheckpoint, match="checksum"):
    checkpoints.load_run(workdir)


def test_a_state_of_another_structure_is_one_line_and_left_in_place(tmp_path, capsys, monkeypatch):
  # A --structure=unit run saved before units' biases became prunable holds masks at the
  # kernels only, where this code builds more. Here the other way round (saved with the
  # biases, resumed by a build that masks kernels only): the same mismatch. Not damage:
  # one line, and nothing is moved.
  import flipout_jax as flipout
  from experiments import run_state

  argv = [
      "--synthetic",
      "--synthetic_train=128",
      "--synthetic_test=64",
      "--batch_size=32",
      "--epochs=2",
      "--no-progress",
      "--no-tensorboard",
      f"--workdir={tmp_path}",
      "--model=lenet300",
      "--sparsity=0.5",
      "--structure=unit",
  ]
  assert mnist.main(argv) == 0
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  built = run_state.model_unit_groups

  def kernels_only(*args, **kwargs):
    groups = built(*args, **kwargs)
    return flipout.UnitGroups(groups.ids, groups.flops, groups.kernels, groups.kernels)

  monkeypatch.setattr(run_state, "model_unit_groups", kernels_only)
  capsys.readouterr()
  assert mnist.main([*argv, "--resume"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "another structure" in err[0], err
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  assert not (tmp_path / checkpoints.DAMAGED_DIR).exists()
