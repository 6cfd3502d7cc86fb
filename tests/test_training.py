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

import numpy as np
import pytest

from ep_megatron.trainer.config import deepspeed_config, load_config, lr_at, moe_config
from ep_megatron.trainer.metrics_io import read_expert_load
from tests.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden_size=128",
    "moe.ffn_hidden_size=64", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=2",
    "train.warmup_steps=2", "rebalance.interval=5", "rebalance.window=5",
]
TRAIN_FIELDS = {"step", "loss", "lr", "tokens_per_s", "aux_losses", "max_over_mean",
                "rebalanced", "slots_moved", "bytes_moved", "grad_norm"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    moe = moe_config(config)
    num_moe = len(range(0, config.model["num_layers"], config.model.get("moe_layer_freq", 1)))
    placement = moe.placement(num_moe, config.train.expert_parallel_size or 4)
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
        ("train.deepspeed_config=missing.json", "train.deepspeed_config='missing.json': cannot read"),
    ],
)
def test_a_wrong_key_or_value_names_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [override])


@pytest.mark.parametrize(
    ("ds_config", "overrides", "message"),
    [
        ({"optimizer": {"type": "Adam"}}, [], r"remove \['optimizer'\]; the optimizer is AdamW"),
        ({"fp16": {"enabled": True}}, [], "fp16 is not supported"),
        ({"zero_optimization": {"stage": 3}}, [], "zero_optimization.stage=3 must be 0, 1 or 2"),
        ({}, ["train.precision=bf16"], "zero_optimization.stage=0 must be"),
        ({"train_micro_batch_size_per_gpu": 1}, [], r"train_micro_batch_size_per_gpu=1 disagrees .* \(4\)"),
        ({"gradient_clipping": 0.5}, [], r"gradient_clipping=0.5 disagrees .* \(1.0\)"),
        ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, [], "bf16.enabled=True disagrees"),
    ],
)
def test_a_deepspeed_config_that_disagrees_with_the_train_section_is_named(tmp_path, ds_config, overrides,
                                                                           message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"train.deepspeed_config={path}", *overrides])


def test_the_train_section_completes_a_shipped_deepspeed_config():
    ds_file = ROOT / "configs" / "ds_zero2.json"
    config = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                         [f"train.deepspeed_config={ds_file}", "train.precision=bf16"])
    ds_config = deepspeed_config(config.train, world_size=4)
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["train_micro_batch_size_per_gpu"] == 4 and ds_config["train_batch_size"] == 16
    assert ds_config["gradient_clipping"] == 1.0 and ds_config["bf16"] == {"enabled": True}


def _torchrun(run_dir: Path, steps: int, extra: list[str], nproc: int = 2) -> subprocess.Popen:
    sets = [arg for item in [*TINY, f"train.steps={steps}", *extra] for arg in ("--set", item)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ep_megatron", "train", str(ROOT / "configs" / "tiny_cpu.yaml"),
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
        assert record["max_over_mean"][0] >= 1.0
    load = read_expert_load(tmp_path)
    assert load.shape == (1, 8) and load.steps.tolist() == list(range(1, 31))
    # every (token, expert) pair of a step is counted once: 2 ranks x 2 seqs x 32 tokens x top-2
    np.testing.assert_array_equal(load.binned_sum(np.arange(31)).sum(axis=(1, 2)), 2 * 2 * 32 * 2)
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
def test_deepspeed_zero2_job_matches_the_torch_job_and_resumes_under_zero1(tmp_path):
    """Same run under torch AdamW and under DeepSpeed ZeRO-2 (rebalancing every 5 steps, checkpoints every
    10): equal losses. The ZeRO-2 checkpoint of step 10 then resumes under ZeRO-1: steps 11-20 equal."""
    extra = ["train.eval_interval=0", "train.checkpoint_interval=10"]
    zero = {stage: f"train.deepspeed_config={ROOT / 'configs' / f'ds_zero{stage}.json'}" for stage in (1, 2)}
    _finish(_torchrun(tmp_path / "torch", 20, extra))
    _finish(_torchrun(tmp_path / "zero2", 20, [*extra, zero[2]]))
    resumed = tmp_path / "zero1_resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    os.symlink(tmp_path / "zero2" / "checkpoints" / "step_00000010", resumed / "step_00000010")
    (resumed / "latest").write_text("step_00000010\n")
    _finish(_torchrun(tmp_path / "zero1_resumed", 20, [*extra, zero[1]]))
    reference, zero2 = _train_losses(tmp_path / "torch"), _train_losses(tmp_path / "zero2")
    zero1 = _train_losses(tmp_path / "zero1_resumed")
    info = json.loads((tmp_path / "zero2" / "run_info.json").read_text())
    assert info["optimizer"] == "DeepSpeed ZeRO stage 2 AdamW"
    moved = [json.loads(line)["slots_moved"] for line in (tmp_path / "zero2" / "metrics.jsonl").open()
             if '"split": "train"' in line]
    assert sum(moved[10:]) > 0, "a rebalance must move slots after the resume point"
    assert sorted(zero2) == list(range(1, 21)) and sorted(zero1) == list(range(11, 21))
    for step in range(1, 21):
        assert zero2[step] == pytest.approx(reference[step], rel=1e-5), step
    for step in range(11, 21):
        assert zero1[step] == pytest.approx(zero2[step], rel=1e-5), step


@pytest.mark.slow
def test_the_job_runs_under_the_deepspeed_launcher_with_a_shipped_ds_config(tmp_path):
    ds_config = f"train.deepspeed_config={ROOT / 'configs' / 'ds_zero1.json'}"
    items = [*TINY, "train.steps=6", "train.eval_batches=1", ds_config]
    sets = [arg for item in items for arg in ("--set", item)]
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
    assert info["optimizer"] == "DeepSpeed ZeRO stage 1 AdamW"
    assert sorted(_train_losses(tmp_path)) == list(range(1, 7))


def test_accumulating_a_micro_batch_twice_gives_its_gradient_aux_losses_included():
    """Gradient accumulation divides the LM loss by the micro-batch count; the aux and z-loss gradients,
    injected outside the loss, must be scaled the same way: two passes over one micro-batch must give
    exactly that micro-batch's gradient (single process, balancing losses on)."""
    import torch

    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel import ParallelGroups
    from ep_megatron.trainer.model import GPTConfig, MoEGPT
    from ep_megatron.trainer.step import forward_backward

    torch.set_default_dtype(torch.float64)
    try:
        gpt = GPTConfig(vocab_size=40, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=4,
                        ffn_hidden_size=64)
        moe = MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2, aux_loss_coeff=0.5,
                        z_loss_coeff=0.1, load_balancing_type="aux_loss")
        placement = moe.placement(2, ep_size=1)
        model = MoEGPT(gpt, lambda i: MoELayer(moe, placement, ParallelGroups.single(), i))
        tokens = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(0))
        batch = (tokens[:, :-1], tokens[:, 1:])
        grads = []
        for micro in ([batch], [batch, batch]):
            model.zero_grad(set_to_none=True)
            loss, rows, aux = forward_backward(
                MoELayers(model), micro, lambda i, t: model(i, t)[0],
                lambda loss: (loss / len(micro)).backward())  # noqa: B023 - called inside this iteration
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
            assert rows == [3 * 16 * 2 * len(micro)] * 2 and aux["aux_loss"] > 0 and aux["z_loss"] > 0
        router = "blocks.0.mlp.router.weight"
        assert not torch.allclose(grads[0][router], 2 * grads[0][router])  # the aux gradient is there
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-12, atol=1e-12, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.slow
def test_gradient_accumulation_equals_a_larger_micro_batch_under_torch_and_deepspeed(tmp_path):
    """2 micro-batches of 1 sequence per step == 1 micro-batch of 2 (the same samples per step), with
    rebalancing every 5 steps: torch AdamW and DeepSpeed ZeRO-1 (gradient_accumulation_steps=2)."""
    extra = ["train.eval_interval=0", "train.checkpoint_interval=0"]
    accumulate = ["train.micro_batch_size=1", "train.grad_accum_steps=2"]
    zero1 = f"train.deepspeed_config={ROOT / 'configs' / 'ds_zero1.json'}"
    _finish(_torchrun(tmp_path / "mbs2", 12, extra))
    _finish(_torchrun(tmp_path / "accum2", 12, [*extra, *accumulate]))
    _finish(_torchrun(tmp_path / "accum2_zero1", 12, [*extra, *accumulate, zero1]))
    reference = _train_losses(tmp_path / "mbs2")
    for run in ("accum2", "accum2_zero1"):
        losses = _train_losses(tmp_path / run)
        assert sorted(losses) == list(range(1, 13))
        for step in range(1, 13):
            assert losses[step] == pytest.approx(reference[step], rel=1e-5), (run, step)
    load = read_expert_load(tmp_path / "accum2")
    np.testing.assert_array_equal(load.binned_sum(np.arange(13)).sum(axis=(1, 2)), 2 * 2 * 32 * 2)
