"""The main job: configs, a real multi-rank run under torchrun, its metrics and report, and resume
after SIGKILL of the whole job."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ep_megatron.training import load_config, lr_at, moe_config
from tests.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden_size=128",
    "moe.ffn_hidden_size=64", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=2",
    "train.warmup_steps=2", "rebalance.interval=5", "rebalance.window=5",
]
TRAIN_FIELDS = {"step", "loss", "lr", "tokens_per_s", "aux_losses", "expert_load", "max_over_mean",
                "rebalanced", "slots_moved", "bytes_moved", "grad_norm"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    moe = moe_config(config, config.train.expert_parallel_size or 4)
    num_moe = len(range(0, config.model["num_layers"], config.model.get("moe_layer_freq", 1)))
    placement = moe.placement(num_moe)
    assert placement.num_slots == moe.num_experts + moe.num_redundant_experts
    assert lr_at(0, config.train) > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown key.*train.stepz"),
        ("moe.top_k=9", r"moe.top_k=9 must be in \[1, num_experts=8\]"),
        ("model.num_heads=3", "model.num_heads"),
        ("train.precision=fp16", "train.precision='fp16' must be 'fp32' or 'bf16'"),
        ("data.seq_len=0", "data.seq_len"),
        ("rebalance.window=0", "rebalance.window"),
        ("optim.lr=1", "section 'optim'"),
    ],
)
def test_a_wrong_key_or_value_names_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [override])


def _torchrun(run_dir: Path, steps: int, extra: list[str], nproc: int = 2) -> subprocess.Popen:
    sets = [arg for item in [*TINY, f"train.steps={steps}", *extra] for arg in ("--set", item)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ep_megatron.cli", "train", str(ROOT / "configs" / "tiny_cpu.yaml"),
               "--run-dir", str(run_dir), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_job(root_pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun starts workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    job, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        job.append(pid)
        frontier.extend(children.get(pid, []))
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.slow
def test_thirty_step_two_rank_run_writes_metrics_and_report(tmp_path):
    out = _finish(_torchrun(tmp_path, 30, ["train.eval_interval=15", "train.checkpoint_interval=15"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in val] == [15, 30]
    for record in train:
        assert set(record) >= TRAIN_FIELDS
        assert len(record["expert_load"]) == 1 and len(record["expert_load"][0]) == 8
        # every (token, expert) pair of the step is counted once: 2 ranks x 2 seqs x 32 tokens x top-2
        assert sum(record["expert_load"][0]) == 2 * 2 * 32 * 2
        assert record["max_over_mean"][0] >= 1.0
    assert sum(r["rebalanced"] for r in train) >= 1 and sum(r["bytes_moved"] for r in train) > 0
    assert train[-1]["loss"] < train[0]["loss"]
    for name in ("loss.png", "expert_load.png", "balance.png", "summary.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "byte-bigram conditional entropy" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000030"


@pytest.mark.slow
def test_resume_after_sigkill_of_the_whole_job_matches_an_uninterrupted_run(tmp_path):
    # Tiny steps take ~10 ms: save every 30 steps so the kill lands between two checkpoints.
    extra = ["train.eval_interval=0", "train.checkpoint_interval=30"]
    _finish(_torchrun(tmp_path / "reference", 120, extra))
    killed = _torchrun(tmp_path / "resumed", 120, extra)
    latest = tmp_path / "resumed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not latest.exists() and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.01)
    assert killed.poll() is None, "the job finished before it could be killed"
    _kill_job(killed.pid)
    killed.communicate()
    saved_step = int(latest.read_text().strip().removeprefix("step_"))
    assert saved_step in (30, 60, 90)
    _finish(_torchrun(tmp_path / "resumed", 120, extra))
    reference, resumed = _train_losses(tmp_path / "reference"), _train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 121))
    for step in range(saved_step + 1, 121):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.slow
def test_the_job_runs_under_the_deepspeed_launcher(tmp_path):
    sets = [arg for item in [*TINY, "train.steps=6", "train.eval_batches=1"] for arg in ("--set", item)]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "scripts" / "pretrain_moe.py"), str(ROOT / "configs" / "tiny_cpu.yaml"),
               "--run-dir", str(tmp_path), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = _finish(proc)
    assert "Process" in out and "exits successfully" in out
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["expert_parallel_size"] == 2
    assert sorted(_train_losses(tmp_path)) == list(range(1, 7))
