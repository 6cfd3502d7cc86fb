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


def test_shipped_configs_are_found_by_name(tmp_path, capsys):
    from ep_megatron.trainer.loop import load_config
    from ep_megatron.trainer.shipped import SHIPPED_DIR, resolve_shipped

    assert resolve_shipped("tiny_cpu", ".yaml") == SHIPPED_DIR / "tiny_cpu.yaml"
    given = tmp_path / "ds_zero1.json"
    given.write_text("{}")
    assert resolve_shipped(given, ".json") == given  # an existing path is used as given
    config = load_config(resolve_shipped("tiny_cpu", ".yaml"), ["train.deepspeed_config=ds_zero1"])
    assert config.train.deepspeed_config == "ds_zero1"
    assert main(["train", "tiny_gpu", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no file 'tiny_gpu'" in err
    assert "configs: deepseek_fine_grained_gpu, mixtral_8x7b_gpu, tiny_cpu" in err


_WITHOUT_EXTRAS = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("deepspeed", "megatron", "tensorboard", "wandb", "tokenizers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Missing())
from ep_megatron.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_core_trains_on_one_process_without_the_extras(tmp_path):
    """What a plain `pip install .` has: no DeepSpeed, Megatron-Core, TensorBoard, W&B or tokenizers."""
    import os
    import subprocess
    import sys

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    sets = ["data.source=" + str(tmp_path / "corpus.txt"), "data.seq_len=32", "train.steps=3",
            "train.warmup_steps=1", "train.micro_batch_size=2", "train.eval_batches=1", "model.num_layers=2",
            "model.hidden_size=32", "model.ffn_hidden_size=64", "moe.ffn_hidden_size=32"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, "train", "tiny_cpu", "--run-dir",
                           str(tmp_path / "run"), *(a for s in sets for a in ("--set", s))],
                          env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "byte-bigram conditional entropy" in proc.stdout
    assert (tmp_path / "run" / "report" / "balance.png").is_file()
