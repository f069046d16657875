"""Every training command refuses what a user can fix in one line with exit status 2, before any
work starts: no training shards, a missing export, an export of another task."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsegps import cli
from sparsegps.exports import EXPORT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"pretrain": "configs/pretrain/tiny_cpu.yaml", "finetune-seg": "configs/seg/synthetic_cpu.yaml",
           "finetune-ground": "configs/ground/synthetic_cpu.yaml"}
EXPORT_KEY = {"pretrain": "init_from", "finetune-seg": "pretrained", "finetune-ground": "pretrained"}
OTHER_TASK = {"pretrain": "segmentation", "finetune-seg": "segmentation", "finetune-ground": "segmentation"}


def run(capsys, command: str, tmp_path: Path, *settings: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main([command, "--config", str(ROOT / CONFIGS[command]), "--output-dir", str(tmp_path / "run"),
                       *[a for s in settings for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    return status, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", list(CONFIGS))
def test_empty_training_data_is_one_line(command, capsys, tmp_path):
    status, err = run(capsys, command, tmp_path, "data.train=[]", f"{EXPORT_KEY[command]}=null")
    assert status == 2
    assert "data.train names no shards" in one_line_error(err)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize("command", list(CONFIGS))
def test_missing_export_is_one_line(command, capsys, tmp_path):
    status, err = run(capsys, command, tmp_path, f"data.train=[{tmp_path}]",
                      f"{EXPORT_KEY[command]}={tmp_path / 'nowhere.safetensors'}")
    assert status == 2
    assert "nowhere.safetensors: no such export file" in one_line_error(err)


@pytest.mark.parametrize("command", list(CONFIGS))
def test_export_of_another_task_is_one_line(command, capsys, tmp_path):
    other = tmp_path / "other.pt"  # an earlier version's export of a task this command cannot start from
    torch.save({"format": EXPORT_FORMAT, "state_dict": {}, "task": OTHER_TASK[command], "model_config": {}}, other)
    status, err = run(capsys, command, tmp_path, f"data.train=[{tmp_path}]", f"{EXPORT_KEY[command]}={other}")
    assert status == 2
    assert f"other.pt: a {OTHER_TASK[command]} export" in one_line_error(err)


@pytest.mark.parametrize("override, message", [
    ("micro_batch=0", "micro_batch: 0 is out of range; allowed: >= 1"),
    ("steps=0", "steps: 0 is out of range; allowed: >= 1"),
    ("checkpoint_every=0", "checkpoint_every: 0 is out of range; allowed: >= 1"),
    ("keep_checkpoints=0", "keep_checkpoints: 0 is out of range; allowed: >= 1"),
    ("data.transforms.voxel_size=0", "data.transforms.voxel_size: 0.0 is out of range; allowed: > 0"),
    ("data.transforms.voxel_size=-0.1", "data.transforms.voxel_size: -0.1 is out of range; allowed: > 0"),
    ("optim.lr_backbone=-0.001", "optim.lr_backbone: -0.001 is out of range; allowed: >= 0"),
    ("model.backbone.enc_blocks=[1,0,1,1]", "model.backbone: SpUNetConfig.enc_blocks: every stage needs at least one"),
])
def test_a_value_out_of_range_is_refused_on_load_naming_the_key(override, message, tmp_path, capsys):
    """Every config value is checked when the config is read (file or --set), in one line naming the
    key and what is allowed, before any work starts."""
    from sparsegps import cli
    from sparsegps.config import ConfigError, load_config
    from sparsegps.train.pretrain import PretrainConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, config, [override])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert cli.main(["pretrain", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_every_shipped_config_loads():
    """Each YAML under configs/ builds its config class (limits checked); each DeepSpeed JSON parses."""
    import json

    from sparsegps.config import load_config
    from sparsegps.eval.relation_probe import ProbeConfig
    from sparsegps.train.finetune_ground import GroundConfig
    from sparsegps.train.finetune_seg import SegConfig
    from sparsegps.train.pretrain import PretrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    classes = {"pretrain": PretrainConfig, "seg": SegConfig, "ground": GroundConfig, "probe": ProbeConfig}
    loaded = []
    for path in sorted(configs.glob("*/*.yaml")):
        load_config(classes[path.parent.name], path)
        loaded.append(path.relative_to(configs))
    for path in sorted(configs.glob("deepspeed/*.json")):
        assert isinstance(json.loads(path.read_text()), dict)
    assert {p.parts[0] for p in loaded} == {"pretrain", "seg", "ground", "probe"} and len(loaded) >= 15


def test_commands_report_failures_through_one_path():
    """A command never prints its own "error:" line and returns: it raises UsageError, which the
    command line prints once (one line, exit status 2, once on several ranks)."""
    import re

    printed = re.compile(r"""print\(f?["']error""")
    offenders = [f"{path.name}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "sparsegps" / "commands").glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if printed.search(line)]
    assert offenders == [], "\n".join(offenders)


def test_voxel_size_comes_from_the_export_or_a_flag_every_export_reader_has(capsys):
    import argparse
    import importlib

    from sparsegps.errors import UsageError
    from sparsegps.exports import ExportInfo

    for command in ("eval_seg", "eval_ground", "eval_pretrain", "show"):
        parser = argparse.ArgumentParser()
        importlib.import_module(f"sparsegps.commands.{command}").add_arguments(parser)
        assert any("--voxel-size" in action.option_strings for action in parser._actions), command
    recorded, unrecorded = ExportInfo("pretraining", {}, voxel_size=0.1), ExportInfo("pretraining", {})
    assert recorded.voxel_size_for("e.safetensors") == 0.1
    assert recorded.voxel_size_for("e.safetensors", 0.2) == 0.2
    assert "trained at voxel size 0.1" in capsys.readouterr().err
    with pytest.raises(UsageError, match="records no voxel size; give it with --voxel-size"):
        unrecorded.voxel_size_for("e.safetensors")
    with pytest.raises(UsageError, match="positive"):
        recorded.voxel_size_for("e.safetensors", -1.0)


def test_a_run_starting_from_an_export_of_another_voxel_size_is_warned(tmp_path):
    import warnings

    from sparsegps.errors import UsageError
    from sparsegps.exports import ExportInfo, read_starting_export, save_export

    path = save_export(tmp_path / "e.safetensors", {"w": torch.zeros(2)}, ExportInfo("pretraining", {}, voxel_size=0.1))
    with pytest.warns(UserWarning, match=r"trained at voxel size 0.1; this run reads scenes at 0.05"):
        read_starting_export(path, ("pretraining",), "finetune-seg --pretrained", 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_starting_export(path, ("pretraining",), "init_from", 0.1).info.voxel_size == 0.1
    with pytest.raises(UsageError, match="finetune-ground --pretrained needs a grounding export"):
        read_starting_export(path, ("grounding",), "finetune-ground --pretrained", 0.1)


@pytest.mark.parametrize("folder", ["yes", "runs/a: b", "runs/#1", "[x]"])
def test_flags_are_config_keys_taken_as_given(folder):
    """A flag sets its config key to the text given (YAML would read `yes` as true, `a: b` as a
    mapping, `#1` as a comment); --set is parsed as YAML, and a flag wins over it."""
    import argparse

    from sparsegps.commands import pretrain as pretrain_command
    from sparsegps.commands.training import load_training_config
    from sparsegps.train.pretrain import PretrainConfig

    parser = argparse.ArgumentParser()
    pretrain_command.add_arguments(parser)
    args = parser.parse_args(["--config", str(ROOT / CONFIGS["pretrain"]), "--output-dir", folder,
                              "--set", "output_dir=elsewhere", "--set", "steps=3", "--overwrite"])
    cfg = load_training_config(PretrainConfig, args)
    assert (cfg.output_dir, cfg.steps, cfg.overwrite) == (folder, 3, True)
