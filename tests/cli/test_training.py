"""The flags of `afconvert finetune` and `afconvert train` are built from FinetuneConfig's fields."""
import dataclasses

import pytest

from afconvert.cli import finetune as finetune_cli
from afconvert.cli import train as train_cli
from afconvert.cli.training import training_config
from afconvert.train.config import FinetuneConfig

REQUIRED = ["--data", "d", "--output", "o"]


def _config(cli, argv):
    return training_config(cli._parser().parse_args(argv))


def test_finetune_defaults_are_the_dataclass_defaults():
    assert _config(finetune_cli, ["student", *REQUIRED]) == FinetuneConfig("d", "o")


def test_train_has_no_distillation_flags_and_its_own_defaults():
    cfg = _config(train_cli, ["resnet18", *REQUIRED])
    distill = {f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata.get("distill")}
    assert distill and all(getattr(cfg, k) == getattr(FinetuneConfig("d", "o"), k) for k in distill)
    assert cfg == dataclasses.replace(FinetuneConfig("d", "o"), lr=1e-3, train_bn=True)
    with pytest.raises(SystemExit):
        train_cli._parser().parse_args(["resnet18", *REQUIRED, "--blend", "0.5"])


def test_every_field_has_a_flag_that_sets_it():
    parser = finetune_cli._parser()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} <= dests
    cfg = _config(finetune_cli, ["student", *REQUIRED, "--aa", "", "--no-progress", "--train-bn", "--input-size", "32",
                                 "40", "--steps", "3", "--scale", "0.5", "1", "--blend", "0.25", "--blend-order",
                                 "progressive", "--clip-grad", "2"])
    assert (cfg.auto_augment, cfg.progress, cfg.train_bn, cfg.input_size, cfg.steps, cfg.scale) == \
        ("", False, True, (32, 40), 3, (0.5, 1.0))
    assert (cfg.blend, cfg.blend_order, cfg.clip_grad) == (0.25, "progressive", 2.0)
    # the last of --train-bn / --no-train-bn wins, as a recipe's flags followed by a variant's
    assert _config(finetune_cli, ["s", *REQUIRED, "--train-bn", "--no-train-bn"]).train_bn is False


@pytest.mark.parametrize("argv", [["--epochs", "2", "--steps", "3"], ["--blend-order", "backwards"]])
def test_conflicting_or_unknown_values_are_refused(argv):
    with pytest.raises(SystemExit):
        finetune_cli._parser().parse_args(["s", *REQUIRED, *argv])
