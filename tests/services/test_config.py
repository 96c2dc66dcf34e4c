"""Config tree: every shipped YAML loads; bad configs fail with precise messages."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import ExperimentConfig, load_config

pytestmark = pytest.mark.service
CONFIGS = sorted((Path(__file__).parents[2] / "deploy" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"digits_nft.yaml", "sd35_medium_nft.yaml", "flux_dev_nft.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.samples_per_step % cfg.rollout.num_samplers == 0


def test_defaults_are_the_embedded_default():
    cfg = load_config(None)
    assert cfg.model.kind == "digits" and cfg.loss.name == "diffusion_nft"


def test_overrides_are_parsed_as_yaml_and_select_the_loss_section():
    cfg = load_config(None, ["loss.name=awm", "loss.clip_range=0.01", "normguard.weight=2", "rollout.group_size=4"])
    assert cfg.loss.name == "awm" and cfg.loss.clip_range == 0.01 and cfg.normguard.weight == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["normguard.wieght=1"], "wieght"),
        (["loss.name=ppo"], "ppo"),
        (["loss.name=flow_grpo"], "sde_noise_level"),
        (["normguard.weight=-1"], "greater than or equal"),
        (["model.kind=sd3"], "model.path is required"),
        (["rollout.num_samplers=3"], "divide evenly"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config(None, overrides)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(None, ["normguard.weight"])


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "deploy" / "serve").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_serve_config_loads(path):
    from services.serving.config import load_serve_config

    cfg = load_serve_config(path)
    assert cfg.default_steps <= cfg.max_steps


def test_cli_user_mistakes_get_a_message_not_a_traceback(tmp_path, capsys):
    """YAML syntax (line and column), malformed overrides, flags among overrides, an impossible output dir."""
    from services.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "YAML syntax error at line 3, column 1" in err and "Traceback" not in err
    assert main(["train", "train.steps"]) == 2
    assert "an override is written key.path=value" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  steps: 3\n")
    assert main(["train", str(good), "train.steps"]) == 2
    assert "not of the form key.path=value" in capsys.readouterr().err
    assert main(["train", str(good), "train.steps.x=1"]) == 2
    assert "'steps' is a value, not a section" in capsys.readouterr().err
    # a flag among the overrides: the override after it still applies (here it is invalid, so it is reported)
    assert main(["train", str(good), "--local", "train.steps=many"]) == 2
    assert "train.steps" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", str(good), "--local", f"train.output_dir={blocker}"]) == 2
    assert "cannot use" in capsys.readouterr().err
