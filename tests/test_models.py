"""MoEGPT: shapes, causality, the injected MoE contract, seeded init, a tiny overfit, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ep_megatron.trainer.model import GPTConfig, MoEGPT

TINY = dict(vocab_size=50, max_seq_len=16, hidden_size=32, num_layers=4, num_heads=4, ffn_hidden_size=64)


class DenseStandIn(nn.Module):
    """A dense MLP with Megatron's MLP contract: ``[seq, batch, hidden] -> (out, bias)``."""

    def __init__(self, hidden: int, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.seen_shapes: list[torch.Size] = []

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen_shapes.append(hidden.shape)
        return self.fc2(torch.relu(self.fc1(hidden))), self.bias


def stand_in_factory(hidden: int):
    return lambda index: DenseStandIn(hidden, index)


def tiny_model(**overrides) -> MoEGPT:
    config = GPTConfig(**{**TINY, **overrides})
    return MoEGPT(config, stand_in_factory(config.hidden_size))


def test_shapes_and_moe_contract() -> None:
    model = tiny_model(moe_layer_freq=2)
    tokens = torch.randint(0, 50, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 50)
    loss, logits2 = model(tokens, tokens)
    assert loss.shape == () and torch.equal(logits, logits2)
    moe = [block.mlp for block in model.blocks if block.is_moe]
    assert [m.layer_index for m in moe] == [0, 1]  # blocks 0 and 2, Megatron's moe_layer_freq rule
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]
    assert all(m.seen_shapes == [torch.Size([10, 3, 32])] * 2 for m in moe)  # [seq, batch, hidden]


def test_dense_without_factory() -> None:
    model = MoEGPT(GPTConfig(**TINY), None)
    assert not any(b.is_moe for b in model.blocks)


def test_causal() -> None:
    model = tiny_model().eval()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_seeded_init_ignores_global_rng_and_tied_head() -> None:
    torch.manual_seed(1)
    a = MoEGPT(GPTConfig(**TINY, seed=3))
    torch.manual_seed(2)
    b = MoEGPT(GPTConfig(**TINY, seed=3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert a.head.weight is a.embed.weight
    untied = MoEGPT(GPTConfig(**TINY, tie_embeddings=False))
    assert untied.head.weight is not untied.embed.weight
    std = a.blocks[0].attn.proj.weight.std().item()
    assert 0.5 < std / (0.02 / (2 * TINY["num_layers"]) ** 0.5) < 1.5  # scaled residual projection


def test_overfit_loss_decreases() -> None:
    torch.manual_seed(0)
    model = tiny_model(moe_layer_freq=2)
    data = torch.randint(0, 50, (4, 13))
    inputs, targets = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(50.0)).item(), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_cpu() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model(tokens, tokens)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = tiny_model().eval()
    tokens = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        expected = model(tokens)
        got = model.cuda()(tokens.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_too_long_sequence() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("hidden_size", -1),
        ("num_layers", 0),
        ("ffn_hidden_size", 0),
        ("moe_layer_freq", 0),
        ("num_heads", 5),
        ("rope_theta", 0.0),
        ("init_std", 0.0),
    ],
)
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        GPTConfig(**{**TINY, field: value})
