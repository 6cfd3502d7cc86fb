"""The ``ep-megatron`` command line: bad input is one error line naming it, exit status 2."""

from pathlib import Path

from ep_megatron.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    assert main(["ckpt", "inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ep-megatron ckpt: error: ") and "missing" in err and "Traceback" not in err


def test_a_bad_config_key_is_named_before_anything_starts(tmp_path, capsys):
    config = str(ROOT / "configs" / "tiny_cpu.yaml")
    args = ["train", config, "--set", "train.stepz=1", "--run-dir", str(tmp_path)]
    assert main(args) == 2
    assert "unknown key(s) train.stepz" in capsys.readouterr().err
