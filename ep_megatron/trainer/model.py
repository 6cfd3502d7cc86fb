"""A compact MoE GPT in plain PyTorch: rotary causal attention, RMSNorm, pre-norm blocks, SwiGLU MLPs.

The MoE MLP is injected: ``moe_factory(moe_layer_index)`` builds the MLP of the ``moe_layer_index``-th
MoE block (0, 1, ... in layer order) and follows Megatron's MLP contract,
``forward(hidden [seq, batch, hidden]) -> (output [seq, batch, hidden], bias | None)``. The model runs
as ``[batch, seq, hidden]`` and transposes (contiguously) around each MoE call.

Layer ``i`` is an MoE block when ``i % moe_layer_freq == 0`` (Megatron-Core's ``moe_layer_freq``);
with no factory every block has the dense MLP. Dense parameters are initialised from ``config.seed``
with their own generator (normal, std ``init_std``; residual output projections scaled by
``1 / sqrt(2 * num_layers)``), so they are identical on every rank whatever the MoE layers draw.

``activation_checkpointing`` keeps only each block's input during the forward and recomputes the block
in backward (``torch.utils.checkpoint``, non-reentrant); the recomputation runs under
:func:`ep_megatron.layer.moe_layer.recomputing`, so MoE layers do not count their load twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ep_megatron.layer.moe_layer import recomputing

MoEFactory = Callable[[int], nn.Module]


@dataclass
class GPTConfig:
    """Shape and initialisation of ``MoEGPT``."""

    vocab_size: int = 257  # token ids in [0, vocab_size) (byte tokenizer: 256 bytes + EOD)
    max_seq_len: int = 128  # longest input sequence (size of the rotary table)
    hidden_size: int = 128  # model width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads; must divide hidden_size, head dim must be even
    ffn_hidden_size: int = 512  # width of the dense SwiGLU MLP
    moe_layer_freq: int = 1  # block i uses the MoE MLP when i % moe_layer_freq == 0
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init of embeddings and linear weights
    seed: int = 0  # seed of the dense-parameter initialisation
    activation_checkpointing: bool = False  # recompute each block in backward (keeps only block inputs)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"ffn_hidden_size: must be > 0, got {self.ffn_hidden_size}")
        if self.moe_layer_freq <= 0:
            raise ValueError(f"moe_layer_freq: must be > 0, got {self.moe_layer_freq}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"num_heads: must divide hidden_size={self.hidden_size} into an even head dim, "
                f"got {self.num_heads}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std: must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.moe_layer_freq == 0


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[seq_len, head_dim]`` fp32 (half-split layout, as Llama / Megatron)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by position; ``cos``/``sin`` are ``[seq, head_dim]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions (``scaled_dot_product_attention``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, hidden] -> [batch, seq, hidden]``."""
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, heads, seq, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, seq, hidden))


class SwiGLU(nn.Module):
    """Dense MLP ``w2(silu(gate(x)) * up(x))``; gate and up are fused in ``w13`` (gate rows first)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., hidden] -> [..., hidden]``."""
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))`` (dense or MoE)."""

    def __init__(self, config: GPTConfig, moe_mlp: nn.Module | None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.is_moe = moe_mlp is not None
        self.mlp = moe_mlp if moe_mlp is not None else SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, hidden] -> [batch, seq, hidden]``; MoE MLPs see ``[seq, batch, hidden]``."""
        if not self.is_moe:
            return self.mlp(x)
        out, bias = self.mlp(x.transpose(0, 1).contiguous())
        out = out if bias is None else out + bias
        return out.transpose(0, 1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, hidden] -> [batch, seq, hidden]``."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self._mlp(self.mlp_norm(x))


class MoEGPT(nn.Module):
    """Decoder-only language model whose MoE blocks' MLPs come from ``moe_factory``."""

    def __init__(self, config: GPTConfig, moe_factory: MoEFactory | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)] if moe_factory else []
        self.blocks = nn.ModuleList(
            Block(config, moe_factory(moe_layers.index(i)) if i in moe_layers else None)
            for i in range(config.num_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_dense_parameters()

    @torch.no_grad()
    def reset_dense_parameters(self) -> None:
        """Initialise every parameter outside the MoE MLPs from ``config.seed`` (MoE MLPs init themselves)."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

        def normal_(weight: torch.Tensor, std: float) -> None:
            weight.copy_(torch.randn(weight.shape, generator=gen) * std)

        normal_(self.embed.weight, cfg.init_std)
        for block in self.blocks:
            normal_(block.attn.qkv.weight, cfg.init_std)
            normal_(block.attn.proj.weight, residual_std)
            if not block.is_moe:
                normal_(block.mlp.w13.weight, cfg.init_std)
                normal_(block.mlp.w2.weight, residual_std)
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        if not cfg.tie_embeddings:
            normal_(self.head.weight, cfg.init_std)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``tokens [batch, seq]`` -> ``logits [batch, seq, vocab]``, or ``(loss [], logits)`` with targets.

        ``loss`` is the mean cross-entropy (fp32) over target tokens; targets equal to -100 are ignored.
        """
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"tokens: sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        for block in self.blocks:
            x = self._block(block, x, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss, logits

    def _block(self, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``block(x)``, checkpointed when ``activation_checkpointing`` and gradients are recorded."""
        if not (self.config.activation_checkpointing and torch.is_grad_enabled()):
            return block(x, cos, sin)
        calls = []

        def run(x: torch.Tensor) -> torch.Tensor:
            if calls:  # the recomputation in backward
                with recomputing():
                    return block(x, cos, sin)
            calls.append(True)
            return block(x, cos, sin)

        return checkpoint(run, x, use_reentrant=False)
