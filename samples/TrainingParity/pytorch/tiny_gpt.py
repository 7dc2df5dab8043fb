"""A small GPT, shaped as Karpathy's minGPT (token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm, an lm_head), and its training setup as minGPT configures it: AdamW over
two parameter groups (weight decay on the Linear layers' weights only, none on biases, LayerNorm weights and
embeddings), betas (0.9, 0.95), a linear warm-up of the learning rate, gradient clipping at norm 1. Dropout is 0: a run
that draws random numbers cannot be replayed step by step. samples/TrainingParity/TinyGpt.cs is its TorchSharp port."""
import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, BLOCK, EMBD, HEADS, LAYERS = 8, 6, 12, 2, 2
BATCH, STEPS, WARMUP, LR, WEIGHT_DECAY = 2, 20, 6, 1e-2, 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(EMBD, 3 * EMBD)
        self.c_proj = nn.Linear(EMBD, EMBD)
        self.register_buffer("bias", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(EMBD, dim=2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(EMBD, 4 * EMBD)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(4 * EMBD, EMBD)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(EMBD)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(EMBD)
        self.mlp = Mlp()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, EMBD)
        self.wpe = nn.Embedding(BLOCK, EMBD)
        self.h = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(EMBD)
        self.lm_head = nn.Linear(EMBD, VOCAB, bias=False)

    def forward(self, idx):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, dtype=torch.long).unsqueeze(0))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def configure_optimizers(model):
    """minGPT's rule: Linear weights decay; biases, LayerNorm weights and Embedding weights do not."""
    decay, no_decay = [], []
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if pn.endswith("bias") or isinstance(m, (nn.LayerNorm, nn.Embedding)):
                no_decay.append(p)
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def warmup(step):
    """The learning rate's factor: linear from 1/WARMUP to 1 over the first WARMUP steps."""
    return min(1.0, (step + 1) / WARMUP)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def batches():
    """A task with structure to learn: each sequence counts up from a random start, modulo VOCAB; predict the next."""
    g = torch.Generator().manual_seed(7)
    result = []
    for _ in range(STEPS):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        seq = (start + torch.arange(BLOCK + 1)) % VOCAB
        result.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return result
