"""Small PyTorch GPT-2s with the parameter names of two layouts this project reads, for numerical comparison.

ReferenceGPT: the reference PyTorch GPT-2 this project ports (tok_emb, pos_emb, trf_blocks with separate
W_Query/W_Key/W_Value, LayerNorm scale/shift, tanh GELU, untied out_head whose bias follows qkv_bias).
NanoGPT: nanoGPT's GPT (transformer.wte/wpe/h/ln_f, fused c_attn in nn.Linear layout, exact erf GELU,
optional biases, lm_head tied to wte). Only compare.py and the tests import this module, so torch stays an
optional dependency of the package.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _causal_attention(q_BHTD, k_BHTD, v_BHTD):
    T = q_BHTD.shape[2]
    scores = q_BHTD @ k_BHTD.transpose(-2, -1) / math.sqrt(q_BHTD.shape[-1])
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q_BHTD.device), diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v_BHTD


class RefLayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class RefGELU(nn.Module):
    """GPT-2's tanh GELU; the reference keeps sqrt(2/pi) as a (persistent) buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("constant", torch.tensor(math.sqrt(2.0 / math.pi)))

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(self.constant * (x + 0.044715 * x.pow(3))))


class RefAttention(nn.Module):
    def __init__(self, emb_dim: int, n_heads: int, context_length: int, qkv_bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.W_Query = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.W_Key = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.W_Value = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(emb_dim, emb_dim)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x_BTC):
        B, T, C = x_BTC.shape
        split = lambda y: y.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_Query(x_BTC)), split(self.W_Key(x_BTC)), split(self.W_Value(x_BTC))
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // self.n_heads)
        scores = scores.masked_fill(self.mask.bool()[:T, :T], float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y)


class RefFeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), RefGELU(), nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x):
        return self.layers(x)


class RefBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = RefAttention(cfg["emb_dim"], cfg["n_heads"], cfg["context_length"], cfg["qkv_bias"])
        self.feedforward = RefFeedForward(cfg["emb_dim"])
        self.norm_layer1 = RefLayerNorm(cfg["emb_dim"])
        self.norm_layer2 = RefLayerNorm(cfg["emb_dim"])

    def forward(self, x):
        x = x + self.attention(self.norm_layer1(x))
        return x + self.feedforward(self.norm_layer2(x))


class ReferenceGPT(nn.Module):
    """The reference GPT-2; cfg holds vocab_size, context_length, emb_dim, n_heads, n_layers, qkv_bias."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.trf_blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RefLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=cfg["qkv_bias"])

    def forward(self, tokens_BT):
        positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        x = self.tok_emb(tokens_BT) + self.pos_emb(positions)
        return self.out_head(self.final_norm(self.trf_blocks(x)))

    def blocks(self) -> list[nn.Module]:
        return list(self.trf_blocks)


def reference_buffers(cfg: dict) -> dict[str, torch.Tensor]:
    """The persistent buffers of ReferenceGPT's state_dict (not weights, but strict=True loading wants them)."""
    model_buffers = {}
    mask = torch.triu(torch.ones(cfg["context_length"], cfg["context_length"]), diagonal=1)
    for i in range(cfg["n_layers"]):
        model_buffers[f"trf_blocks.{i}.attention.mask"] = mask.clone()
        model_buffers[f"trf_blocks.{i}.feedforward.layers.1.constant"] = torch.tensor(math.sqrt(2.0 / math.pi))
    return model_buffers


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x_BTC):
        B, T, C = x_BTC.shape
        q, k, v = self.c_attn(x_BTC).split(C, dim=2)
        split = lambda y: y.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        y = _causal_attention(split(q), split(k), split(v))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool, approximate: str):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, args: dict, approximate: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args["n_embd"], bias=args["bias"])
        self.attn = NanoAttention(args["n_embd"], args["n_head"], args["bias"])
        self.ln_2 = nn.LayerNorm(args["n_embd"], bias=args["bias"])
        self.mlp = NanoMLP(args["n_embd"], args["bias"], approximate)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT from its model_args (n_layer, n_head, n_embd, block_size, bias, vocab_size).

    approximate="none" is nanoGPT's nn.GELU(); "tanh" gives the GELU of OpenAI's GPT-2 and llm.c.
    """

    def __init__(self, args: dict, approximate: str = "none"):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(args["vocab_size"], args["n_embd"]),
            wpe=nn.Embedding(args["block_size"], args["n_embd"]),
            h=nn.ModuleList([NanoBlock(args, approximate) for _ in range(args["n_layer"])]),
            ln_f=nn.LayerNorm(args["n_embd"], bias=args["bias"]),
        ))
        self.lm_head = nn.Linear(args["n_embd"], args["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, tokens_BT):
        positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        x = self.transformer.wte(tokens_BT) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.h)


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter random values (LayerNorm weights around 1) so that no mapping hides behind 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = p.ndim == 1 and (name.endswith("scale") or ".ln_" in name or "norm" in name) \
                and not name.endswith(("bias", "shift"))
            p.normal_(1.0 if is_norm_weight else 0.0, 0.1 if p.ndim == 1 else std, generator=gen)
    return model.eval()


def causal_lm_logits(model: nn.Module, tokens_BT) -> torch.Tensor:
    """float32 logits of any of these models or a transformers GPT2LMHeadModel."""
    out = model(tokens_BT)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()
