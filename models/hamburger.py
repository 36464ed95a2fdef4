#!/usr/bin/env python3
"""A small HAMburger-style multi-token model, trained here from a committed kjv-target.

HAMburger (Accelerating LLM Inference via Token Smashing, 2025; reference code Jingyu6/hamburger)
wraps a base LLM with a compositional embedder (the tokens of one step -> one input embedding)
and a micro-step decoder (base features -> the further tokens of a step, plus a stop head). Each
base forward ("macro step") then stores one KV entry and can emit up to 4 tokens.

What this script does (one command: models/build.sh --hamburger, or run it with the training venv):
  1. Recovers the base in float32 from a committed int4 export (models/kjv-target as of commit
     BASE_REVISION, read from git; --base to choose another): the MatMulNBits weights are
     dequantized, nothing is retrained from scratch.
  2. Segments training text into steps by the original base's per-token entropy, with the
     reference's "decreasing" rule (a step opens with any token; a following token joins while
     its entropy is under 0.05 nats or under 0.3x the step's largest, up to 4 tokens). The prompt
     part of each training window (16-64 tokens) stays one token per step, as the reference keeps
     instructions unmerged.
  3. Fine-tunes base + embedder + micro decoder + stop head jointly: cross-entropy for every
     token (t0 from the base's lm_head, t1.. from the micro decoder) + 0.5 x binary cross-entropy
     of the stop head (label 1 on the last token of each step), as the reference does.
  4. Exports three ONNX graphs (embedder.onnx, base.onnx, micro.onnx), quantizes their MatMuls to
     int4 MatMulNBits (block 32) with ONNX Runtime's quantizer, and writes
     multitoken_config.json (the contract: docs in models/README.md) and genai_config.json.

Documented simplifications against the reference: 3 tapped states (outputs of layers 2 and 4 of
6, and the final normed state) instead of 4 of 16; a 2-layer micro decoder initialised from the
base's last two layers, with its own final norm; a 2-layer stop-head MLP; the step's position
follows the reference's training path and GPT-fast path (the position of the step's last token),
not the HF generate path, which is one higher.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
import build  # noqa: E402  (corpus and helpers shared with the other models)

D, HEADS, KV_HEADS, HEAD, FFN, LAYERS, VOCAB = 384, 6, 2, 64, 1024, 6, 4096
TAPPED_LAYERS = (2, 4)      # outputs of these layers (1-based) + the final normed state
MICRO_LAYERS = 2
MAX_STEP = 4
EPS = 1e-5
THETA = 10000.0
OPSET = 21


def log(msg: str) -> None:
    print(f"[hamburger {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * self.weight


def rope(x, pos):
    """Non-interleaved rotary embedding (as Llama and GroupQueryAttention's default)."""
    inv = 1.0 / (THETA ** (torch.arange(0, HEAD, 2, dtype=torch.float32) / HEAD))
    ang = pos.to(torch.float32)[..., None] * inv          # [B, S, HEAD/2]
    cos, sin = ang.cos()[:, None].to(x.dtype), ang.sin()[:, None].to(x.dtype)
    x1, x2 = x[..., : HEAD // 2], x[..., HEAD // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_norm = RMSNorm()
        self.qkv = nn.Linear(D, D + 2 * KV_HEADS * HEAD, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.post_norm = RMSNorm()
        self.gate = nn.Linear(D, FFN, bias=False)
        self.up = nn.Linear(D, FFN, bias=False)
        self.down = nn.Linear(FFN, D, bias=False)

    def forward(self, x, pos, mask, past=None, explicit=False):
        """x [B,S,D]; pos [B,S]; mask bool [B or 1,1,S,P+S] (True = may attend)."""
        B, S, _ = x.shape
        qkv = self.qkv(self.input_norm(x))
        q, k, v = qkv.split([D, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=-1)
        q = rope(q.view(B, S, HEADS, HEAD).transpose(1, 2), pos)
        k = rope(k.view(B, S, KV_HEADS, HEAD).transpose(1, 2), pos)
        v = v.view(B, S, KV_HEADS, HEAD).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = HEADS // KV_HEADS
        if explicit:
            # Plain ops for the ONNX export. The query heads of a KV head are grouped and the KV
            # broadcast over them, so no step copies the whole cache (as repeat_interleave's
            # Tile would).
            qg = q.reshape(B, KV_HEADS, rep, S, HEAD)
            scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(HEAD))
            scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
            att = (torch.softmax(scores, dim=-1) @ v.unsqueeze(2)).reshape(B, HEADS, S, HEAD)
        else:
            kk = k.repeat_interleave(rep, dim=1)
            vv = v.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.o(att.transpose(1, 2).reshape(B, S, D))
        h = self.post_norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x, present


class Base(nn.Module):
    """The Llama base, fed input embeddings; returns the final normed state and the taps."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = RMSNorm()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, embeds, pos, mask, past=None, explicit=False):
        x, taps, presents = embeds, [], []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, pos, mask, None if past is None else past[i], explicit)
            presents.append(present)
            if i + 1 in TAPPED_LAYERS:
                taps.append(x)
        final = self.norm(x)
        taps.append(final)
        return final, torch.stack(taps, dim=2), presents   # taps [B,S,3,D]


class Embedder(nn.Module):
    """Compositional embedder: mean of the step's token embeddings plus one attention query
    (from the mean) over them, with learned position vectors concatenated to the keys/values
    (as the reference). A one-token step is its plain embedding."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.pos = nn.Parameter(torch.empty(MAX_STEP, D // 2))
        nn.init.xavier_uniform_(self.pos)
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D + D // 2, D, bias=False)
        self.v = nn.Linear(D + D // 2, D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        nn.init.zeros_(self.out.weight)  # starts as the plain mean

    def forward(self, ids, lengths):
        """ids [N,K] (padding anything >= 0), lengths [N] in 1..K -> [N,D]."""
        N, K = ids.shape
        e = self.embed(ids)
        valid = torch.arange(K)[None, :] < lengths[:, None]                 # [N,K]
        mean = (e * valid[..., None].to(e.dtype)).sum(1) / lengths[:, None].to(e.dtype)
        q = self.q(mean).view(N, HEADS, 1, HEAD)
        kv_in = torch.cat([e, self.pos[:K][None].expand(N, K, D // 2).to(e.dtype)], dim=-1)
        k = self.k(kv_in).view(N, K, HEADS, HEAD).transpose(1, 2)
        v = self.v(kv_in).view(N, K, HEADS, HEAD).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(HEAD))       # [N,H,1,K]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        att = (torch.softmax(scores, dim=-1) @ v).reshape(N, D)
        merged = mean + self.out(att)
        return torch.where((lengths == 1)[:, None], e[:, 0], merged)


class StopHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)

    def forward(self, h):
        return self.out(F.silu(self.fc(h))).squeeze(-1)


class Micro(nn.Module):
    """Micro-step decoder: [taps..., emb(t0), emb(t1), ...] -> next token of the step."""

    def __init__(self, base: Base):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(MICRO_LAYERS))
        for mine, theirs in zip(self.layers, base.layers[-MICRO_LAYERS:]):
            mine.load_state_dict(theirs.state_dict())
        self.norm = RMSNorm()
        self.norm.load_state_dict(base.norm.state_dict())

    def forward(self, x, pos, mask, past=None, explicit=False):
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, pos, mask, None if past is None else past[i], explicit)
            presents.append(present)
        return self.norm(x), presents


class HamburgerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = Base()
        self.embedder = Embedder(self.base.embed)
        self.micro = None
        self.stop = StopHead()

    def attach_micro(self):
        self.micro = Micro(self.base)


# ------------------------------------------------------------------ base from the int4 export
def dequantize_target(folder: Path) -> Base:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def q4(prefix: str) -> torch.Tensor:
        packed = inits[prefix + ".MatMul.weight_Q4"]            # [N, K/32, 16] uint8
        scales = inits[prefix + ".MatMul.weight_scales"]        # [N, K/32]
        lo = (packed & 0x0F).astype(np.int8) - 8
        hi = (packed >> 4).astype(np.int8) - 8
        vals = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], packed.shape[1], 32)
        w = vals.astype(np.float32) * scales[..., None]
        return torch.from_numpy(w.reshape(packed.shape[0], -1).copy())   # [N, K] = Linear weight

    base = Base()
    sd = {"embed.weight": torch.from_numpy(inits["model.embed_tokens.weight"].copy()),
          "norm.weight": torch.from_numpy(inits[f"model.layers.{LAYERS}.final_norm_layernorm.weight"].copy()),
          "lm_head.weight": q4("lm_head")}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        sd[f"layers.{i}.input_norm.weight"] = torch.from_numpy(inits[f"{p}.input_layernorm.weight"].copy())
        sd[f"layers.{i}.post_norm.weight"] = torch.from_numpy(inits[f"{p}.post_attention_layernorm.weight"].copy())
        sd[f"layers.{i}.qkv.weight"] = q4(f"{p}.attn.qkv_proj")
        sd[f"layers.{i}.o.weight"] = q4(f"{p}.attn.o_proj")
        for name in ("gate", "up", "down"):
            sd[f"layers.{i}.{name}.weight"] = q4(f"{p}.mlp.{name}_proj")
    base.load_state_dict(sd)
    return base


def causal(S: int, P: int = 0) -> torch.Tensor:
    return (torch.arange(P + S)[None, :] <= (torch.arange(S)[:, None] + P))[None, None]


@torch.no_grad()
def plain_logits(base: Base, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T)
    final, _, _ = base(base.embed(ids), pos, causal(T))
    return base.lm_head(final)


# ------------------------------------------------------------------ segmentation and batches
def segment(probs: np.ndarray, start: int, min_p: float = 0.5) -> list[tuple[int, int]]:
    """Steps (first index, length) over positions start..len-1: a step opens with any token and
    takes the following ones while the original base gave them probability >= min_p (at most
    MAX_STEP tokens). The reference's rule is by entropy (< 0.05 nats or < 0.3x the step's
    largest); on this 12M model it merges almost nothing (1.10 tokens per step on validation
    text), so the probability of the chosen token is used instead."""
    steps, i, T = [], start, len(probs)
    while i < T:
        n = 1
        while i + n < T and n < MAX_STEP and probs[i + n] >= min_p:
            n += 1
        steps.append((i, n))
        i += n
    return steps


@torch.no_grad()
def self_generated(teacher: Base, data, windows: int, gen: torch.Generator, prompt: int = 48,
                   total: int = 256, batch: int = 128):
    """Training text for the multi-token modules: a corpus opening of `prompt` tokens continued
    by the original base itself (greedy, or sampled at temperature 0.7 or 1.0, one third each),
    because at inference the micro decoder continues the base's own text, which is far more
    predictable than held-out Bible text. Returns token ids [W,total] and, for each token, the
    base's probability of it (0 in the prompt)."""
    all_ids, all_p = [], []
    for first in range(0, windows, batch):
        B = min(batch, windows - first)
        starts = torch.randint(0, len(data) - prompt - 1, (B,), generator=gen)
        ids = torch.stack([data[s:s + prompt] for s in starts])
        temps = torch.tensor([0.0, 0.7, 1.0])[torch.randint(0, 3, (B,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            final, _, past = teacher(teacher.embed(ids), torch.arange(prompt)[None].expand(B, -1), causal(prompt))
            logits = teacher.lm_head(final[:, -1]).float()
            seq, probs = [ids], [torch.zeros(B, prompt)]
            for t in range(prompt, total):
                p = torch.softmax(logits, -1)
                scaled = torch.softmax(logits / temps.clamp(min=1e-3)[:, None], -1)
                sampled = torch.multinomial(scaled, 1, generator=gen)[:, 0]
                nxt = torch.where(temps == 0, p.argmax(-1), sampled)
                probs.append(p.gather(1, nxt[:, None]))
                seq.append(nxt[:, None])
                if t + 1 == total:
                    break
                final, _, past = teacher(teacher.embed(nxt[:, None]), torch.full((B, 1), t), causal(1, t), past)
                logits = teacher.lm_head(final[:, -1]).float()
        all_ids.append(torch.cat(seq, 1))
        all_p.append(torch.cat(probs, 1))
        log(f"self-generated text: {first + B}/{windows} windows")
    return torch.cat(all_ids), torch.cat(all_p).numpy(), prompt


def make_batch(corpus, rows: torch.Tensor):
    windows, probs, prompt = corpus
    plan = [[(i, 1) for i in range(prompt)] + segment(probs[r], prompt) for r in rows.tolist()]
    B, M = len(plan), max(len(s) for s in plan)
    ids = torch.zeros(B, M, MAX_STEP, dtype=torch.long)
    lengths = torch.ones(B, M, dtype=torch.long)
    pos = torch.zeros(B, M, dtype=torch.long)
    valid = torch.zeros(B, M, dtype=torch.bool)
    segmented = torch.zeros(B, M, dtype=torch.bool)   # the step lies in the merged region
    for b, (r, steps) in enumerate(zip(rows.tolist(), plan)):
        for m, (first, n) in enumerate(steps):
            ids[b, m, :n] = windows[r, first:first + n]
            lengths[b, m] = n
            pos[b, m] = first + n - 1                     # position of the step's last token
            valid[b, m] = True
            segmented[b, m] = first + n >= prompt
    return ids, lengths, pos, valid, segmented


def losses(model: HamburgerModel, batch, region_only: bool = False):
    """Training losses; with `region_only`, t0 is scored only where the next step lies after
    the prompt (for comparisons with the base on the same tokens)."""
    ids, lengths, pos, valid, segmented = batch
    B, M, _ = ids.shape
    embeds = model.embedder(ids.view(-1, MAX_STEP), lengths.view(-1)).view(B, M, D)
    final, taps, _ = model.base(embeds, pos, causal(M))
    has_next = valid[:, 1:]                                 # step m has a successor
    if region_only:
        has_next = has_next & segmented[:, 1:]
    nxt_ids, nxt_len = ids[:, 1:], lengths[:, 1:]
    cur_final = final[:, :-1]
    # t0 of the next step from the base's lm_head, for every step
    lm = model.base.lm_head(cur_final[has_next]).float()
    ce_base = F.cross_entropy(lm, nxt_ids[:, :, 0][has_next])
    # stop after t0: where the next step is a segmented one
    stop_rows = has_next & segmented[:, :-1]
    stop0 = model.stop(cur_final[stop_rows]).float()
    stop0_label = (nxt_len[stop_rows] == 1).float()
    # micro rows: the next step has >= 2 tokens
    mrows = has_next & (nxt_len >= 2)
    feats = taps[:, :-1][mrows]                             # [R,3,D]
    toks = nxt_ids[mrows]                                   # [R,4]
    n = nxt_len[mrows]                                      # [R]
    R, ntap = feats.shape[0], feats.shape[1]
    x = torch.cat([feats, model.base.embed(toks[:, : MAX_STEP - 1])], dim=1)   # [R,3+3,D]
    S = x.shape[1]
    mpos = torch.arange(S)[None].expand(R, S)
    h, _ = model.micro(x, mpos, causal(S))
    out = h[:, ntap:]                                       # positions of emb(t0..t2) -> t1..t3
    j = torch.arange(MAX_STEP - 1)[None].expand(R, -1)      # out j emits token j+1
    live = (j + 1) < n[:, None]
    ce_micro = F.cross_entropy(model.base.lm_head(out[live]).float(), toks[:, 1:][live])
    stop_m = model.stop(out[live]).float()
    stop_m_label = ((j + 1) == (n[:, None] - 1))[live].float()
    stop_logits = torch.cat([stop0, stop_m])
    stop_labels = torch.cat([stop0_label, stop_m_label])
    bce = F.binary_cross_entropy_with_logits(stop_logits, stop_labels)
    tokens = lm.shape[0] + int(live.sum())
    ce = (ce_base * lm.shape[0] + ce_micro * int(live.sum())) / tokens
    return ce, bce, {"ce_base": ce_base.item(), "ce_micro": ce_micro.item(), "bce": bce.item(),
                     "tokens_per_step": tokens / max(1, lm.shape[0])}


@torch.no_grad()
def plain_validation_loss(base: Base, valid_data, batches=16, seq=256) -> float:
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        starts = torch.randint(0, len(valid_data) - seq - 1, (16,), generator=gen)
        x = torch.stack([valid_data[s:s + seq] for s in starts])
        y = torch.stack([valid_data[s + 1:s + seq + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = plain_logits(base, x).float()
        total += F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item()
    return total / batches


@torch.no_grad()
def step_validation(model, corpus, batches=4) -> dict:
    """Losses on held-out self-generated windows (openings of validation chapters)."""
    acc = {"ce_base": 0.0, "ce_micro": 0.0, "bce": 0.0, "tokens_per_step": 0.0}
    rows = torch.arange(len(corpus[0]))
    for i in range(batches):
        b = make_batch(corpus, rows[i::batches])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, stats = losses(model, b)
        for k in acc:
            acc[k] += stats[k] / batches
    return {k: round(v, 3) for k, v in acc.items()}


@torch.no_grad()
def compare_with_base(model, teacher, corpus) -> dict:
    """Per-token loss on held-out windows (validation openings continued by the original base),
    over the tokens after the prompt: the multi-token model with its steps merged as in training
    (t0 from the base on merged inputs, the rest from the micro decoder) against the original
    base reading the same text one token at a time."""
    windows, probs, prompt = corpus
    batch = make_batch(corpus, torch.arange(len(windows)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _, stats = losses(model, batch, region_only=True)
        logits = plain_logits(teacher, windows).float()
    target = windows[:, prompt:]
    base_ce = F.cross_entropy(logits[:, prompt - 1:-1].reshape(-1, VOCAB), target.reshape(-1)).item()
    return {"multitoken_loss_after_prompt": round(ce.item(), 3), "original_base_loss_after_prompt": round(base_ce, 3),
            "tokens_per_step_in_training_segmentation": round(stats["tokens_per_step"], 3)}


# ------------------------------------------------------------------ training
def train(model, corpus, seconds: float, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base_params = list(model.base.parameters())
    base_ids = {id(p) for p in base_params}
    new_params = [p for p in model.parameters() if id(p) not in base_ids]
    opt = torch.optim.AdamW([{"params": base_params, "lr": 3e-4, "peak": 3e-4},
                             {"params": new_params, "lr": 2e-3, "peak": 2e-3}],
                            weight_decay=0.05, betas=(0.9, 0.95))
    start, step = time.time(), 0
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            break
        progress = elapsed / seconds
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            g["lr"] = g["peak"] * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        b = make_batch(corpus, torch.randint(0, len(corpus[0]), (batch,), generator=gen))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, bce, stats = losses(model, b)
            loss = ce + 0.5 * bce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"step {step} ({elapsed:.0f}s) ce_base {stats['ce_base']:.3f} ce_micro "
                f"{stats['ce_micro']:.3f} stop {stats['bce']:.3f} tokens/step {stats['tokens_per_step']:.2f}")
        step += 1
    return {"steps": step, "train_seconds": round(time.time() - start), "batch_size": batch}


# ------------------------------------------------------------------ export
class EmbedderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedder = model.embedder

    def forward(self, step_ids, step_lengths):
        return self.embedder(step_ids, step_lengths)[None]          # [1,S,D]


class BaseGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.base, self.stop = model.base, model.stop

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        S = inputs_embeds.shape[1]
        T = attention_mask.shape[1]
        P = T - S
        allowed = (torch.arange(T)[None, :] <= (torch.arange(S)[:, None] + P))[None, None]
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(LAYERS)]
        final, taps, presents = self.base(inputs_embeds, position_ids, allowed, pairs, explicit=True)
        logits = self.base.lm_head(final)
        stop = self.stop(final)
        flat = [t for kv in presents for t in kv]
        return (logits, taps, stop, *flat)


class MicroGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.micro, self.stop = model.micro, model.stop
        self.embed, self.lm_head = model.base.embed, model.base.lm_head

    def forward(self, features, input_ids, *past):
        x = torch.cat([features, self.embed(input_ids)], dim=1)      # [1,F+n,D]
        S = x.shape[1]
        P = past[0].shape[2]
        pos = (torch.arange(S) + P)[None]
        allowed = (torch.arange(P + S)[None, :] <= (torch.arange(S)[:, None] + P))[None, None]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(MICRO_LAYERS)]
        h, presents = self.micro(x, pos, allowed, pairs, explicit=True)
        last = h[:, -1]                                                # [1,D]
        flat = [t for kv in presents for t in kv]
        return (self.lm_head(last), self.stop(last), *flat)


# The base and micro graphs are written node by node with ONNX Runtime's fused operators
# (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, RotaryEmbedding with explicit
# position ids, GroupQueryAttention), as onnxruntime-genai's builder writes its graphs: the
# torch.onnx export of the same modules ran about 2x slower per step, in many small ops.
class GraphWriter:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, outputs=1, domain="", **attrs):
        from onnx import helper
        outs = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh("/" + op_type), domain=domain, **attrs))
        return outs if len(outs) > 1 else outs[0]

    def linear(self, x, lin: nn.Linear, name: str):
        y = self.op("MatMul", [x, self.const(name + ".weight", lin.weight.detach().float().numpy().T.copy())])
        if lin.bias is not None:
            y = self.op("Add", [y, self.const(name + ".bias", lin.bias.detach().float().numpy())])
        return y

    def norm_weight(self, name, norm: RMSNorm):
        return self.const(name, norm.weight.detach().float().numpy())

    def rope_caches(self, prefix: str, positions: int):
        inv = 1.0 / (THETA ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD))
        ang = np.arange(positions, dtype=np.float32)[:, None] * inv[None]
        return (self.const(prefix + "cos_cache", np.cos(ang).astype(np.float32)),
                self.const(prefix + "sin_cache", np.sin(ang).astype(np.float32)))

    def decoder_layers(self, x, mods, prefix, pos, past, seqlens, total, rope, taps_after=()):
        """Llama layers over the residual stream `x`; returns (residual, last MLP output,
        presents, residuals after the layers in `taps_after`)."""
        cos, sin = rope
        presents, taps = [], []
        h = self.op("SimplifiedLayerNormalization", [x, self.norm_weight(f"{prefix}.0.input_norm", mods[0].input_norm)],
                    axis=-1, epsilon=EPS)
        res, down = x, None
        for i, layer in enumerate(mods):
            if i > 0:
                h, _, _, res = self.op("SkipSimplifiedLayerNormalization",
                                       [res, down, self.norm_weight(f"{prefix}.{i}.input_norm", layer.input_norm)],
                                       outputs=[self.fresh("h"), "", "", self.fresh("residual")], domain="com.microsoft", epsilon=EPS)
                if i in taps_after:
                    taps.append(res)
            qkv = self.linear(h, layer.qkv, f"{prefix}.{i}.qkv")
            sizes = self.const(f"{prefix}.{i}.qkv_sizes", np.array([D, KV_HEADS * HEAD, KV_HEADS * HEAD], np.int64))
            q, k, v = self.op("Split", [qkv, sizes], outputs=3, axis=-1)
            q = self.op("RotaryEmbedding", [q, pos, cos, sin], domain="com.microsoft", interleaved=0, num_heads=HEADS)
            k = self.op("RotaryEmbedding", [k, pos, cos, sin], domain="com.microsoft", interleaved=0, num_heads=KV_HEADS)
            att, pk, pv = self.op("GroupQueryAttention", [q, k, v, past[2 * i], past[2 * i + 1], seqlens, total],
                                  outputs=[self.fresh("attention"), f"present.{i}.key", f"present.{i}.value"],
                                  domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, scale=1.0 / math.sqrt(HEAD))
            presents += [pk, pv]
            o = self.linear(att, layer.o, f"{prefix}.{i}.o")
            h2, _, _, res = self.op("SkipSimplifiedLayerNormalization",
                                    [res, o, self.norm_weight(f"{prefix}.{i}.post_norm", layer.post_norm)],
                                    outputs=[self.fresh("h"), "", "", self.fresh("residual")], domain="com.microsoft", epsilon=EPS)
            gate = self.linear(h2, layer.gate, f"{prefix}.{i}.gate")
            up = self.linear(h2, layer.up, f"{prefix}.{i}.up")
            act = self.op("Mul", [self.op("Mul", [gate, self.op("Sigmoid", [gate])]), up])
            down = self.linear(act, layer.down, f"{prefix}.{i}.down")
        return res, down, presents, taps

    def stop_head(self, x, stop: StopHead):
        fc = self.linear(x, stop.fc, "stop.fc")
        act = self.op("Mul", [fc, self.op("Sigmoid", [fc])])
        out = self.linear(act, stop.out, "stop.out")
        return self.op("Squeeze", [out, self.const("stop_axes", np.array([-1], np.int64))], outputs=["stop_logits"])

    def save(self, path: Path, inputs, outputs):
        import onnx
        from onnx import helper
        graph = helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                  ir_version=10)  # what ONNX Runtime 1.31 reads
        onnx.save(model, str(path))


def kv_value_infos(layers: int, past_dim: str, present_dim: str):
    from onnx import TensorProto, helper
    ins, outs = [], []
    for i in range(layers):
        for kind in ("key", "value"):
            ins.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [1, KV_HEADS, past_dim, HEAD]))
            outs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [1, KV_HEADS, present_dim, HEAD]))
    return ins, outs


def write_base_graph(model: HamburgerModel, path: Path):
    from onnx import TensorProto, helper
    g = GraphWriter()
    base = model.base
    # GroupQueryAttention's lengths: every position of the mask is a real one (batch of one).
    total64 = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("one", np.array(1, np.int64))], axis=0)
    total = g.op("Cast", [total64], to=TensorProto.INT32)
    seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const("axis1", np.array([1], np.int64))], keepdims=0),
                                          g.const("one_1d", np.array([1], np.int64))])], to=TensorProto.INT32)
    past = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    res, down, _, taps = g.decoder_layers("inputs_embeds", list(base.layers), "base.layers", "position_ids", past, seqlens, total,
                                          g.rope_caches("base.", build.CONTEXT), taps_after=TAPPED_LAYERS)
    final, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [res, down, g.norm_weight("base.norm", base.norm)],
                          outputs=["final_state", "", "", g.fresh("residual")], domain="com.microsoft", epsilon=EPS)
    axis2 = g.const("axis2", np.array([2], np.int64))
    g.op("Concat", [g.op("Unsqueeze", [t, axis2]) for t in taps + [final]], outputs=["hidden_states"], axis=2)
    g.op("MatMul", [final, g.const("lm_head.weight", base.lm_head.weight.detach().float().numpy().T.copy())], outputs=["logits"])
    g.stop_head(final, model.stop)
    kv_in, kv_out = kv_value_infos(LAYERS, "past_sequence_length", "total_sequence_length")
    f = TensorProto.FLOAT
    g.save(path,
           [helper.make_tensor_value_info("inputs_embeds", f, [1, "sequence_length", D]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "sequence_length"]), *kv_in],
           [helper.make_tensor_value_info("logits", f, [1, "sequence_length", VOCAB]),
            helper.make_tensor_value_info("hidden_states", f, [1, "sequence_length", len(TAPPED_LAYERS) + 1, D]),
            helper.make_tensor_value_info("stop_logits", f, [1, "sequence_length"]), *kv_out])


def write_micro_graph(model: HamburgerModel, path: Path):
    from onnx import TensorProto, helper
    g = GraphWriter()
    micro = model.micro
    emb = g.op("Gather", [g.const("embed_tokens.weight", model.base.embed.weight.detach().float().numpy()), "input_ids"], axis=0)
    x = g.op("Concat", ["features", emb], axis=1)
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const("two", np.array(2, np.int64))], axis=0)
    seq_len = g.op("Gather", [g.op("Shape", [x]), g.const("one", np.array(1, np.int64))], axis=0)
    end = g.op("Add", [past_len, seq_len])
    pos = g.op("Unsqueeze", [g.op("Range", [past_len, end, g.const("step", np.array(1, np.int64))]), g.const("axis0", np.array([0], np.int64))])
    total = g.op("Cast", [end], to=TensorProto.INT32)
    seqlens = g.op("Cast", [g.op("Reshape", [g.op("Sub", [end, g.const("one_s", np.array(1, np.int64))]),
                                             g.const("shape1", np.array([1], np.int64))])], to=TensorProto.INT32)
    past = [f"past_key_values.{i}.{k}" for i in range(MICRO_LAYERS) for k in ("key", "value")]
    res, down, _, _ = g.decoder_layers(x, list(micro.layers), "micro.layers", pos, past, seqlens, total, g.rope_caches("micro.", 64))
    normed, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [res, down, g.norm_weight("micro.norm", micro.norm)],
                           outputs=[g.fresh("normed"), "", "", g.fresh("residual")], domain="com.microsoft", epsilon=EPS)
    last = g.op("Squeeze", [g.op("Slice", [normed, g.const("minus1", np.array([-1], np.int64)),
                                           g.const("big", np.array([1 << 62], np.int64)), g.const("axis1", np.array([1], np.int64))]),
                            g.const("sq_axis1", np.array([1], np.int64))])
    g.op("MatMul", [last, g.const("lm_head.weight", model.base.lm_head.weight.detach().float().numpy().T.copy())], outputs=["logits"])
    g.stop_head(last, model.stop)
    kv_in, kv_out = kv_value_infos(MICRO_LAYERS, "past_sequence_length", "total_sequence_length")
    f = TensorProto.FLOAT
    g.save(path,
           [helper.make_tensor_value_info("features", f, [1, "features", D]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence_length"]), *kv_in],
           [helper.make_tensor_value_info("logits", f, [1, VOCAB]), helper.make_tensor_value_info("stop_logits", f, [1]), *kv_out])


@torch.no_grad()
def check_fused_graphs(model: HamburgerModel, folder: Path):
    """The hand-written graphs against the torch modules they were written from, on random
    inputs with past, several positions and positions that skip (merged steps)."""
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    sessions = {n: ort.InferenceSession(str(folder / f"{n}.onnx"), providers=["CPUExecutionProvider"]) for n in ("base", "micro")}
    worst = 0.0
    for past_len, steps in ((0, 7), (5, 1), (6, 3)):
        embeds = rng.standard_normal((1, steps, D)).astype(np.float32) * 0.05
        pos = np.array([[past_len + 2 * i for i in range(steps)]], np.int64)
        past = [rng.standard_normal((1, KV_HEADS, past_len, HEAD)).astype(np.float32) for _ in range(2 * LAYERS)]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past_len + steps), np.int64), "position_ids": pos,
                 **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}}
        ours = sessions["base"].run(["logits", "hidden_states", "stop_logits"], feeds)
        theirs = BaseGraph(model)(torch.from_numpy(embeds), torch.ones(1, past_len + steps, dtype=torch.long),
                                  torch.from_numpy(pos), *map(torch.from_numpy, past))[:3]
        worst = max(worst, *(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours, theirs)))
    for past_len, features in ((0, len(TAPPED_LAYERS) + 1), (4, 0)):
        feats = rng.standard_normal((1, features, D)).astype(np.float32)
        ids = np.array([[17]], np.int64)
        past = [rng.standard_normal((1, KV_HEADS, past_len, HEAD)).astype(np.float32) for _ in range(2 * MICRO_LAYERS)]
        feeds = {"features": feats, "input_ids": ids,
                 **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}}
        ours = sessions["micro"].run(["logits", "stop_logits"], feeds)
        theirs = MicroGraph(model)(torch.from_numpy(feats), torch.from_numpy(ids), *map(torch.from_numpy, past))[:2]
        worst = max(worst, *(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours, theirs)))
    log(f"fused graphs against the torch modules: largest difference {worst:.2e}")
    if worst > 1e-3:
        sys.exit(f"the fused graphs differ from the torch modules by {worst}")


def export_graph(module, args, path: Path, inputs, outputs, axes):
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def quantize_int4(src: Path, dst: Path):
    """MatMul -> MatMulNBits (int4, block 32, symmetric, int8 compute like the builder's
    accuracy_level 4); Gather (token embeddings) -> GatherBlockQuantized int4."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
                             op_types_to_quantize=("MatMul", "Gather"),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    data = dst.with_suffix(".onnx.data")
    data.unlink(missing_ok=True)
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    # the quantizer names the data file after the model: make it predictable
    produced = dst.parent / (dst.name + ".data")
    if not produced.exists():
        cands = [p for p in dst.parent.iterdir() if p.name.startswith(dst.stem) and p.suffix == ".data"]
        if cands:
            cands[0].rename(produced)
    for path in (dst, produced):
        path.chmod(0o644)  # the quantizer writes its data file private; models are read by a service user
    build.check_int4(dst)


def export_all(model: HamburgerModel, out: Path, target: Path, threshold: float, report: dict):
    model.eval().float()
    tmp = out / "fp32"
    if out.exists():
        shutil.rmtree(out)
    tmp.mkdir(parents=True)
    with torch.no_grad():
        export_graph(EmbedderGraph(model), (torch.zeros(3, 2, dtype=torch.long), torch.tensor([1, 2, 2])),
                     tmp / "embedder.onnx", ["step_ids", "step_lengths"], ["inputs_embeds"],
                     {"step_ids": {0: "steps", 1: "tokens"}, "step_lengths": {0: "steps"},
                      "inputs_embeds": {1: "steps"}})
    write_base_graph(model, tmp / "base.onnx")
    write_micro_graph(model, tmp / "micro.onnx")
    check_fused_graphs(model, tmp)
    for name in ("embedder", "base", "micro"):
        quantize_int4(tmp / f"{name}.onnx", out / f"{name}.onnx")
    shutil.rmtree(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (target / name).exists():
            shutil.copy(target / name, out / name)
    genai = json.loads((target / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    dec["filename"] = "base.onnx"
    dec["inputs"] = {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                     "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                     "past_value_names": "past_key_values.%d.value"}
    dec["outputs"]["hidden_states"] = "hidden_states"
    genai["search"]["past_present_share_buffer"] = False
    (out / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
    contract = {
        "type": "hamburger",
        "version": 1,
        "embedder": {"filename": "embedder.onnx", "inputs": {"step_ids": "step_ids", "step_lengths": "step_lengths"},
                     "outputs": {"inputs_embeds": "inputs_embeds"}},
        "base": {"filename": "base.onnx", "hidden_states": "hidden_states", "stop_logits": "stop_logits"},
        "micro": {"filename": "micro.onnx", "num_hidden_layers": MICRO_LAYERS, "num_key_value_heads": KV_HEADS,
                  "head_size": HEAD,
                  "inputs": {"features": "features", "input_ids": "input_ids",
                             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                  "outputs": {"logits": "logits", "stop_logits": "stop_logits",
                              "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}},
        "tapped_layers": list(TAPPED_LAYERS),
        "features": len(TAPPED_LAYERS) + 1,
        "max_tokens_per_step": MAX_STEP,
        "threshold": threshold,
        "position": "last_token",
    }
    (out / "multitoken_config.json").write_text(json.dumps(contract, indent=4) + "\n")
    report["files_bytes"] = sum(p.stat().st_size for p in out.iterdir())


# ------------------------------------------------------------------ main
# The commit whose models/kjv-target the committed kjv-hamburger was made from. kjv-target was
# retrained afterwards (with dropout, for a clearer gap to its draft); the multi-token model keeps
# its base, so that this script still reproduces it. `--base models/kjv-target` builds one on the
# current target instead.
BASE_REVISION = "4f5e589"


def base_from_git(revision: str, dest: Path) -> Path:
    """models/kjv-target as it was at `revision`, written out of the git history into `dest`."""
    import subprocess
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:models/kjv-target"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        blob = subprocess.run(["git", "show", f"{revision}:models/kjv-target/{name}"], cwd=ROOT,
                              check=True, capture_output=True).stdout
        (dest / name).write_bytes(blob)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".edgellm" / "model-build")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--windows", type=int, default=3072, help="self-generated training windows")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="default continue threshold written to multitoken_config.json")
    ap.add_argument("--stages", default="train,eval,export")
    ap.add_argument("--base", type=Path, default=None,
                    help="the int4 base folder; default: models/kjv-target as of commit "
                         f"{BASE_REVISION}, read from git (the one the committed kjv-hamburger was made from)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    stages = set(args.stages.split(","))
    out = build.MODELS / "kjv-hamburger"
    args.work.mkdir(parents=True, exist_ok=True)
    target = args.base or base_from_git(BASE_REVISION, args.work / f"kjv-target-{BASE_REVISION}")
    log(f"base: {target}")
    ckpt = args.work / "hamburger.pt"

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(target / "tokenizer.json"))
    eos = tok.token_to_id(build.EOS)
    chapters = build.read_kjv()
    train_docs, valid_docs = build.split_corpus(chapters)

    def encode(docs):
        ids = [eos]
        for _, text in docs:
            ids.extend(tok.encode(text, add_special_tokens=False).ids)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    train_data, valid_data = encode(train_docs), encode(valid_docs)
    log(f"tokens: {len(train_data)} train, {len(valid_data)} validation")
    teacher = dequantize_target(target).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    report_path = build.MODELS / "build-report.json"
    full_report = json.loads(report_path.read_text())
    report = full_report.get("hamburger", {})
    report["base"] = str(args.base) if args.base else f"models/kjv-target at commit {BASE_REVISION}"

    model = HamburgerModel()
    model.base.load_state_dict(teacher.state_dict())
    model.attach_micro()
    if "train" in stages:
        report["base_plain_validation_loss_before"] = round(plain_validation_loss(teacher, valid_data), 3)
        log(f"recovered base: plain validation loss {report['base_plain_validation_loss_before']}")
        gen = torch.Generator().manual_seed(6)
        t0 = time.time()
        corpus = self_generated(teacher, train_data, args.windows, gen)
        held_out = self_generated(teacher, valid_data, 64, gen)
        report["self_generated"] = {"windows": args.windows, "tokens_per_window": 256, "prompt_tokens": 48,
                                    "seconds": round(time.time() - t0)}
        torch.manual_seed(5)
        report.update(train(model, corpus, args.minutes * 60, args.batch_size, seed=5))
        torch.save(model.state_dict(), ckpt)
        report["base_plain_validation_loss_after"] = round(plain_validation_loss(model.base, valid_data), 3)
        report["step_validation"] = step_validation(model, held_out)
        log(f"validation: {report}")
    else:
        model.load_state_dict(torch.load(ckpt))
    if "eval" in stages:
        held_out = self_generated(teacher, valid_data, 64, torch.Generator().manual_seed(7))
        report["held_out_comparison"] = compare_with_base(model.eval(), teacher, held_out)
        log(f"held-out comparison: {report['held_out_comparison']}")
    report.update({"micro_layers": MICRO_LAYERS, "tapped_layers": list(TAPPED_LAYERS),
                   "max_tokens_per_step": MAX_STEP,
                   "parameters_added": sum(p.numel() for n, p in model.named_parameters()
                                           if not n.startswith("base."))})
    if "export" in stages:
        export_all(model, out, target, args.threshold, report)
        log(f"exported {out}: {report['files_bytes'] / 1e6:.1f} MB")
    full_report["hamburger"] = report
    report_path.write_text(json.dumps(full_report, indent=2) + "\n")


if __name__ == "__main__":
    main()
