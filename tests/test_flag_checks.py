"""Flags a user gets wrong: each is one message (UserError, printed without a traceback), never a silent
different run (a negative --max_steps used to train the epochs; --max_step was taken for --max_steps)."""
from __future__ import annotations

import pytest

from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.errors import UserError

TYPES = (ModelArguments, DataArguments, TrainArguments)
BASE = ["--output_dir", "unused-out", "--report_to", "none"]


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "-3"], "--max_steps -3: give a positive number"),
    (["--max_steps", "0"], "--max_steps 0: give a positive number"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: must not be negative"),
    (["--max_eval_samples", "-3"], "--max_eval_samples -3: must be at least 1"),
    (["--max_step", "3"], "unknown option(s): --max_step (did you mean --max_steps"),
    (["--max_stepz", "3"], "unknown option(s): --max_stepz (did you mean --max_steps"),
    (["--learning_rate", "abc"], "invalid float value: 'abc'"),
])
def test_bad_flags_are_one_message(flags, message):
    with pytest.raises(UserError) as error:
        parse_arguments(TYPES, BASE + flags)
    assert message in str(error.value)


def test_the_default_max_steps_still_means_epochs():
    *_, training = parse_arguments(TYPES, BASE)
    assert training.max_steps == -1 and training.num_train_epochs > 0


def test_a_missing_resume_checkpoint_is_named_as_missing(tmp_path):
    from types import SimpleNamespace

    from lmtrain.training.checkpoints import resolve_resume

    args = SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-99"), output_dir=str(tmp_path))
    with pytest.raises(UserError, match="checkpoint-99: no such directory"):
        resolve_resume(args)


def test_a_typo_of_a_builtin_config_names_the_builtin_one(monkeypatch):
    import lmtrain.locations as locations
    from lmtrain.model.config import resolve_config

    monkeypatch.setattr(locations, "_hub_unreachable", lambda timeout=3.0: "no network in this test")
    with pytest.raises(UserError, match=r"built-in configs close to it: qwen2-tiny"):
        resolve_config("qwen2-tinyy")


def test_batch_size_help_mentions_auto(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(TYPES, ["--help"])
    assert "or auto" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1e-4", "-1E-4", "-.5", "-2"])
def test_a_negative_number_in_any_notation_is_a_value_not_a_flag(tmp_path, value):
    # argparse alone takes -1e-4 for an unknown flag and says "expected one argument"
    with pytest.raises(UserError, match=r"--z_loss_coefficient -.*must be 0 \(off\) or more"):
        parse_arguments([ModelArguments, DataArguments, TrainArguments],
                        ["--z_loss_coefficient", value, "--output_dir", str(tmp_path)])
