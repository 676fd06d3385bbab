"""Command-line error paths: bad input gets one stderr line and exit status 2, never a traceback."""

import dataclasses
import os
import subprocess
import sys

import pytest

from experiments import cifar, cli, digits, imagenette, mnist, plot
from experiments import config as config_lib


def one_error_line(capsys) -> str:
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert "Traceback" not in captured.err
  assert lines[0].startswith("python -m experiments.")
  return lines[0]


@pytest.mark.parametrize(
    "entry_point, argv, expected",
    [
        (cifar, ["--model=vgg7"], "invalid choice: 'vgg7'"),
        (cifar, ["--model=lenet300"], "invalid choice: 'lenet300'"),  # not a CIFAR model
        (mnist, ["--model=vgg19"], "invalid choice: 'vgg19'"),
        (imagenette, ["--model=resnet18"], "invalid choice: 'resnet18'"),
        (cifar, ["--method=obd"], "invalid choice: 'obd'"),
        (cifar, ["--sparsity=1.0"], "--sparsity must be in [0, 1)"),
        (cifar, ["--sparsity=-0.1"], "--sparsity must be in [0, 1)"),
        (mnist, ["--epochs=0"], "--epochs must be an integer >= 1"),
        (mnist, ["--epochs=two"], "invalid int value: 'two'"),
        (cifar, ["--milestones=150;250"], "milestones must be comma-separated epochs"),
        (cifar, ["--milestones=250,150"], "--milestones must be strictly increasing"),
        (cifar, ["--milestones=0"], "--milestones must be strictly increasing positive"),
        (cifar, ["--prune_rate=1"], "--prune_rate must be in (0, 1)"),
        (cifar, ["--lr=0"], "--lr must be > 0"),
        (mnist, ["--dataset=cifar10"], "invalid choice: 'cifar10'"),
        (cifar, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, entry_point, argv, expected):
  assert entry_point.main(argv) == 2
  assert expected in one_error_line(capsys)


def test_unprepared_dataset_exits_2_saying_how_to_prepare_it(capsys, tmp_path):
  assert cifar.main([f"--data_dir={tmp_path}", "--epochs=1"]) == 2
  line = one_error_line(capsys)
  assert "cifar10 is not prepared" in line and "tfds build cifar10" in line
  assert "--synthetic" in line


def test_missing_mnist_t10k_files_exit_2(capsys, tmp_path):
  assert mnist.main(["--dataset=mnist_t10k", f"--data_dir={tmp_path}"]) == 2
  assert "mnist_t10k needs" in one_error_line(capsys)


def test_batch_larger_than_the_training_set_exits_2(capsys, tmp_path):
  argv = [
      "--dataset=mnist_t10k",
      "--synthetic",
      "--synthetic_train=32",
      "--batch_size=64",
      f"--workdir={tmp_path}",
  ]
  assert mnist.main(argv) == 2
  assert "--batch_size=64 is larger than the 32 training images" in one_error_line(capsys)


def test_schedule_too_short_for_the_target_exits_2(capsys, tmp_path):
  # 99.9% at rate 0.5 needs 10 events, so at least 11 steps; one epoch of 2 steps has 2.
  argv = [
      "--synthetic",
      "--synthetic_train=32",
      "--batch_size=16",
      "--epochs=1",
      "--sparsity=0.999",
      f"--workdir={tmp_path}",
  ]
  assert mnist.main(argv) == 2
  assert "cannot reach --sparsity=0.999" in one_error_line(capsys)


def test_existing_checkpoints_need_resume_and_the_same_run(capsys, tmp_path):
  argv = [
      "--method=dense",
      "--synthetic",
      "--synthetic_train=32",
      "--synthetic_test=8",
      "--batch_size=16",
      "--epochs=1",
      f"--workdir={tmp_path}",
      "--no-progress",
      "--no-tensorboard",
  ]
  assert mnist.main(argv) == 0
  capsys.readouterr()
  assert mnist.main(argv) == 2
  assert "already holds checkpoints; pass --resume" in one_error_line(capsys)
  assert mnist.main([*argv, "--resume", "--lr=0.5"]) == 2
  assert "from another run (--lr 0.1 -> 0.5)" in one_error_line(capsys)
  assert mnist.main([*argv, "--resume"]) == 0  # finished: reports it again


def test_help_exits_0(capsys):
  assert cifar.main(["--help"]) == 0
  help_text = capsys.readouterr().out
  for flag in (
      "--method",
      "--sparsity",
      "--epochs",
      "--batch_size",
      "--lr",
      "--milestones",
      "--momentum",
      "--weight_decay",
      "--noise_scale",
      "--p",
      "--prune_rate",
      "--seed",
      "--workdir",
      "--resume",
      "--synthetic",
      "--model",
  ):
    assert flag in help_text


def test_cifar_defaults_are_the_papers_vgg19_run():
  defaults = cifar.DEFAULTS
  expected = dict(
      dataset="cifar10",
      model="vgg19",
      method="flipout",
      sparsity=0.999,
      epochs=350,
      batch_size=128,
      lr=0.1,
      milestones=(150, 250),
      momentum=0.9,
      weight_decay=5e-4,
      noise_scale=None,  # the method's default: 1 for flipout, as the paper
      p=2.0,
      prune_rate=0.5,
      synthetic=False,
      init="torch",  # PyTorch's default initialisation, as the authors' models
  )
  assert {key: getattr(defaults, key) for key in expected} == expected
  assert config_lib.noise_scale_of(defaults) == 1.0
  parsed = vars(cli.build_parser(defaults, cifar.MODELS).parse_args([]))
  # No --init: main takes the entry default for a new run, the checkpoint's on --resume.
  assert parsed.pop("init") is None
  assert dataclasses.replace(defaults, **parsed) == defaults


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--methods=flipout,obd"], "methods must be a comma-separated subset"),
        (["--sparsities=0.9,1.5"], "sparsities must be in (0, 1)"),
        (["--epochs=0"], "--epochs must be >= 1"),
    ],
)
def test_digits_bad_flags_exit_2(capsys, argv, expected):
  assert digits.main(argv) == 2
  assert expected in one_error_line(capsys)


def test_plot_without_summaries_exits_2(capsys, tmp_path):
  assert plot.main([str(tmp_path)]) == 2
  assert "no summary.json of a finished run" in one_error_line(capsys)


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        ("experiments.cifar", ["--model=nope"], "invalid choice: 'nope'"),
        ("experiments.imagenette", ["--data_dir={tmp}"], "imagenette/320px-v2 is not prepared"),
    ],
)
def test_real_process_prints_one_line_and_no_traceback(tmp_path, module, argv, expected):
  """The same through a real interpreter: nothing else (warnings, tracebacks) on stderr."""
  argv = [arg.format(tmp=tmp_path) for arg in argv]
  result = subprocess.run(
      [sys.executable, "-m", module, *argv],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 2
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and expected in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_each_flag_is_described_once_in_config_and_the_docs_table_is_current():
  import dataclasses
  import pathlib

  from experiments import cli, config

  described = cli.field_help()
  assert set(described) == {f.name for f in dataclasses.fields(config.Config)}
  assert all(text and "``" not in text for text in described.values())
  parser = cli.build_parser(config.Config())
  helps = {action.dest: action.help for action in parser._actions}
  assert helps["unit_round_to"] == described["unit_round_to"]
  assert helps["progress"] == described["progress"]
  docs = (pathlib.Path(__file__).parents[1] / "docs" / "experiments.md").read_text()
  begin, end = "<!-- flags table: begin -->\n", "\n<!-- flags table: end -->"
  assert (
      docs.split(begin)[1].split(end)[0] == cli.flags_table()
  ), "docs/experiments.md's flag table is stale: paste `python -m experiments.cli` into it"


def test_the_cifar_entry_point_runs_the_configs_defaults():
  from experiments import cifar, config

  assert cifar.DEFAULTS == config.Config()
