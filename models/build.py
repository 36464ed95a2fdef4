#!/usr/bin/env python3
"""Build edgellm's test models from scratch, on CPU, from text a Debian package ships.

Stages (each writes into --work, the last ones into models/ and tests/):
  corpus     King James Bible from Debian's bible-kjv, one document per chapter
  tokenizer  byte-level BPE (vocab 4096) with ChatML-style chat template
  target     LlamaForCausalLM, ~12.6M parameters, trained from random init
  draft      LlamaForCausalLM, ~1.4M parameters, distilled from the target (KL to its logits)
  qwen2      a tiny Qwen2 with random weights: a second architecture for the engine's tests
  export     onnxruntime-genai's model builder, int4 (MatMulNBits, block 32), CPU
  fp16io     tiny-qwen2 with float16 KV and logits (models/fp16_io.py), for the float16 path
  pair       kjv-speculative/: onnxruntime-genai's own speculative config over the two
  reference  greedy token ids from onnxruntime-genai for tests/reference_outputs.json

Seeds are fixed; weights may still differ between machines by float noise (thread scheduling
in torch's CPU kernels), the configs and the procedure do not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TESTS = ROOT / "tests"

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 4096
CONTEXT = 1024
SEQ_LEN = 256
# Residual dropout of the target: see add_residual_dropout.
TARGET_DROPOUT = 0.2

TARGET = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
              num_attention_heads=6, num_key_value_heads=2)
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)
QWEN2 = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

# Prompts for reference outputs: openings of validation chapters plus a few free ones.
FREE_PROMPTS = [
    "In the beginning God created",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the",
    "The LORD is my shepherd;",
]


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- corpus
def read_kjv() -> list[tuple[str, str]]:
    """(chapter name, text) for every chapter, verses joined by newlines, numbers dropped."""
    if shutil.which("bible") is None:
        sys.exit("models/build.py: the `bible` program is missing: apt-get install bible-kjv")
    raw = subprocess.run(["bible", "-l", "100000", "Gen1:1-Rev22:21"], check=True,
                         capture_output=True, text=True).stdout
    chapters: list[tuple[str, list[str]]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append((line.strip(), []))
            continue
        number, _, verse = line.strip().partition(" ")
        if number.isdigit() and chapters:
            chapters[-1][1].append(verse.strip())
    return [(name, "\n".join(verses)) for name, verses in chapters if verses]


def split_corpus(chapters):
    """Every 20th chapter is validation: the split is by chapter, so no verse is in both."""
    train = [c for i, c in enumerate(chapters) if i % 20 != 7]
    valid = [c for i, c in enumerate(chapters) if i % 20 == 7]
    return train, valid


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(train_texts, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = CONTEXT
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def encode_docs(tokenizer, docs) -> "torch.Tensor":
    import torch
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = [eos]
    for _, text in docs:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)  # end-of-text between chapters: the models learn to stop
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- models
def llama_config(shape: dict, eos_id: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, rope_theta=10000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=eos_id,
                       eos_token_id=eos_id, pad_token_id=eos_id, hidden_act="silu",
                       attention_bias=False, mlp_bias=False, torch_dtype="float32", **shape)


def batches(data, batch_size: int, generator):
    import torch
    starts = torch.randint(0, len(data) - SEQ_LEN - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + SEQ_LEN] for s in starts])
    y = torch.stack([data[s + 1:s + SEQ_LEN + 1] for s in starts])
    return x, y


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@__import__("functools").lru_cache(maxsize=None)
def _torch():
    import torch
    torch.set_num_threads(os.cpu_count() or 2)
    return torch


def validation_loss(model, valid, batches_n: int = 16) -> float:
    torch = _torch()
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(batches_n):
            x, y = batches(valid, 16, gen)
            logits = model(input_ids=x).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE),
                                                       y.reshape(-1)).item()
    model.train()
    return total / batches_n


def add_residual_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on every attention and MLP output before the residual add.

    Llama in transformers has only attention-probability dropout; without this the target
    memorised the million training tokens (training loss 2.3 against 3.2 on validation) and was
    barely better than its distilled draft. Hooks act only in training mode: the exported graphs
    are unchanged."""
    torch = _torch()
    drop = torch.nn.functional.dropout

    def hook(module, _inputs, output):
        if isinstance(output, tuple):
            return (drop(output[0], p, module.training),) + tuple(output[1:])
        return drop(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def train(model, train_data, valid, steps: int, batch_size: int, peak_lr: float, seed: int,
          teacher=None, name: str = "model", eval_every: int = 100) -> dict:
    """Next-token training; with a teacher, the loss is KL(teacher || student) on its logits.

    Validation loss is measured every `eval_every` steps; the weights with the lowest one are kept
    (and the curve is reported), so a run that starts to over-fit ends at its best point.
    Eager on purpose: torch.compile made a target step 12% faster but trained it worse (same
    seeds, 80 steps: validation 5.058 against 4.979 eager; a 700-step build ended at 3.480)."""
    torch = _torch()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    curve: list[list] = []
    best_val, best_state = float("inf"), None
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        x, y = batches(train_data, batch_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits.float()
            if teacher is None:
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))
            else:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x).logits.float()
                loss = torch.nn.functional.kl_div(
                    torch.log_softmax(logits, -1).reshape(-1, VOCAB_SIZE),
                    torch.log_softmax(t_logits, -1).reshape(-1, VOCAB_SIZE),
                    log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            val = validation_loss(model, valid)
            curve.append([step + 1, round(loss.item(), 3), round(val, 3)])
            log(f"{name} step {step + 1}/{steps} train loss {loss.item():.3f} "
                f"validation {val:.3f} ({time.time() - start:.0f}s)")
            if val < best_val:
                best_val = val
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.time() - start
    model.load_state_dict(best_state)
    best_step = min(curve, key=lambda row: row[2])[0]
    log(f"{name}: validation loss {best_val:.3f} (step {best_step}) after {seconds:.0f}s")
    return {"steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN, "peak_lr": peak_lr,
            "train_seconds": round(seconds), "validation_loss": round(best_val, 3),
            "kept_step": best_step, "curve_step_train_validation": curve}


def save_hf(model, tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- export
def export(hf_dir: Path, out: Path, work: Path, python: str):
    if out.exists():
        shutil.rmtree(out)
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"),
           "--extra_options", "block_size=32", "hf_remote=false"]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=work)
    check_int4(out / "model.onnx")
    # The builder is told the chat template through tokenizer_config.json; newer exports also
    # write chat_template.jinja. Keep only what the runtime reads.
    for leftover in ("special_tokens_map.json",):
        (out / leftover).unlink(missing_ok=True)


def check_int4(model_path: Path) -> int:
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    if not nbits:
        sys.exit(f"{model_path}: no com.microsoft MatMulNBits node: not an int4 export")
    for node in nbits:
        bits = {a.name: a.i for a in node.attribute}.get("bits")
        if bits != 4:
            sys.exit(f"{model_path}: MatMulNBits node {node.name} has bits={bits}, expected 4")
    log(f"{model_path.parent.name}: {len(nbits)} MatMulNBits nodes, bits 4")
    return len(nbits)


def write_speculative_pair(target: Path, draft: Path, out: Path, max_draft_tokens: int = 4):
    """onnxruntime-genai's own speculative mode over the committed pair (the peer we measure).

    onnxruntime-genai 0.18 turns speculative decoding on by the presence of `model.draft`
    (`model.type` stays the target's), and rejects `..` in `model.decoder.filename`; so the pair
    folder holds relative symlinks to the two model folders and names files through them. Each
    weight file is stored once.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for link, dest in (("target", target), ("draft", draft)):
        (out / link).symlink_to(os.path.relpath(dest, out))
    cfg = json.loads((target / "genai_config.json").read_text())
    draft_decoder = json.loads((draft / "genai_config.json").read_text())["model"]["decoder"]
    cfg["model"]["decoder"]["filename"] = "target/" + cfg["model"]["decoder"]["filename"]
    draft_decoder["filename"] = "draft/" + draft_decoder["filename"]
    cfg["model"]["draft"] = draft_decoder
    cfg["speculative"] = {"max_draft_tokens": max_draft_tokens}
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (target / name).exists():
            (out / name).symlink_to(Path("target") / name)


# ---------------------------------------------------------------- reference outputs
def reference_prompts(valid) -> list[str]:
    prompts = list(FREE_PROMPTS)
    for _, text in valid[:: max(1, len(valid) // 6)][:6]:
        words = text.split("\n")[0].split()
        prompts.append(" ".join(words[: min(10, len(words))]))
    return prompts


def genai_greedy(model_dir: Path, prompts, new_tokens: int) -> list[dict]:
    import onnxruntime_genai as og
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    out = []
    for prompt in prompts:
        ids = list(tokenizer.encode(prompt))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        new = []
        while not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        out.append({"prompt": prompt, "prompt_ids": [int(i) for i in ids], "output_ids": new,
                    "text": tokenizer.decode(new)})
    return out


CHAT_CASES = [
    [("user", "Who made the heaven and the earth?")],
    [("system", "Answer in the words of the King James Bible."), ("user", "What is love?")],
    [("user", "Hello"), ("assistant", "Peace be unto you."), ("user", "And unto thee.")],
]


def genai_chat(model_dir: Path) -> list[dict]:
    """The chat template as onnxruntime-genai applies it: the engine must render the same."""
    import onnxruntime_genai as og
    tokenizer = og.Tokenizer(og.Model(str(model_dir)))
    out = []
    for case in CHAT_CASES:
        messages = json.dumps([{"role": r, "content": c} for r, c in case])
        out.append({"messages": case,
                    "rendered": tokenizer.apply_chat_template(messages, add_generation_prompt=True)})
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    build_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".edgellm" / "model-build")
    # Sized for the 60-minute plan on 2 cores (see models/README.md for the measured times).
    ap.add_argument("--target-steps", type=int, default=700)
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stages", default="corpus,tokenizer,target,draft,qwen2,export,fp16io,pair,reference")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch = _torch()
    from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    chapters = read_kjv()
    train_docs, valid_docs = split_corpus(chapters)
    log(f"corpus: {len(chapters)} chapters, {len(train_docs)} train, {len(valid_docs)} validation")
    tok_dir = work / "tokenizer"
    if "tokenizer" in stages or not tok_dir.exists():
        train_tokenizer([t for _, t in train_docs], tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    train_data = encode_docs(tokenizer, train_docs)
    valid_data = encode_docs(tokenizer, valid_docs)
    log(f"tokens: {len(train_data)} train, {len(valid_data)} validation")
    report_path = work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["corpus"] = {"chapters": len(chapters), "train_chapters": len(train_docs),
                        "validation_chapters": len(valid_docs), "train_tokens": len(train_data),
                        "validation_tokens": len(valid_data)}

    hf_target, hf_draft, hf_qwen = work / "hf-target", work / "hf-draft", work / "hf-qwen2"
    if "target" in stages:
        torch.manual_seed(1)
        target = LlamaForCausalLM(llama_config(TARGET, eos_id))
        add_residual_dropout(target, TARGET_DROPOUT)
        report["target"] = {"parameters": sum(p.numel() for p in target.parameters()), **TARGET,
                            "dropout": TARGET_DROPOUT,
                            **train(target, train_data, valid_data, args.target_steps,
                                    args.batch_size, 2e-3, seed=1, name="target")}
        save_hf(target, tokenizer, hf_target)
    if "draft" in stages:
        teacher = LlamaForCausalLM.from_pretrained(hf_target).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(2)
        draft = LlamaForCausalLM(llama_config(DRAFT, eos_id))
        report["draft"] = {"parameters": sum(p.numel() for p in draft.parameters()), **DRAFT,
                           **train(draft, train_data, valid_data, args.draft_steps,
                                   args.batch_size, 3e-3, seed=2, teacher=teacher, name="draft")}
        report["target"]["validation_loss_check"] = round(validation_loss(teacher, valid_data), 3)
        save_hf(draft, tokenizer, hf_draft)
    if "qwen2" in stages:
        torch.manual_seed(3)
        qcfg = Qwen2Config(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, rope_theta=10000.0,
                           tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
                           torch_dtype="float32", use_sliding_window=False, **QWEN2)
        qwen = Qwen2ForCausalLM(qcfg)  # random weights: only the architecture is under test
        report["qwen2"] = {"parameters": sum(p.numel() for p in qwen.parameters()), **QWEN2,
                           "weights": "random (seed 3)"}
        save_hf(qwen, tokenizer, hf_qwen)
    report_path.write_text(json.dumps(report, indent=2) + "\n")

    python = sys.executable
    out_target, out_draft = MODELS / "kjv-target", MODELS / "kjv-draft"
    out_pair, out_qwen = MODELS / "kjv-speculative", MODELS / "tiny-qwen2"
    if "export" in stages:
        export(hf_target, out_target, work, python)
        export(hf_draft, out_draft, work, python)
        export(hf_qwen, out_qwen, work, python)
    out_fp16 = MODELS / "tiny-qwen2-fp16io"
    if "fp16io" in stages:
        # float16 KV and logits, as GPU exports have them, runnable on the CPU provider.
        subprocess.run([python, str(MODELS / "fp16_io.py"), str(out_qwen), str(out_fp16)], check=True)
    if "pair" in stages:
        write_speculative_pair(out_target, out_draft, out_pair)
    if "reference" in stages:
        prompts = reference_prompts(valid_docs)
        refs = {"new_tokens": 64, "generator": "onnxruntime-genai greedy (do_sample=false)",
                "models": {}}
        for name, path in (("kjv-target", out_target), ("kjv-draft", out_draft),
                           ("tiny-qwen2", out_qwen), ("tiny-qwen2-fp16io", out_fp16)):
            refs["models"][name] = genai_greedy(path, prompts, 64)
            log(f"reference {name}: {refs['models'][name][0]['text']!r}")
        refs["chat"] = genai_chat(out_target)
        TESTS.mkdir(exist_ok=True)
        (TESTS / "reference_outputs.json").write_text(json.dumps(refs, indent=1) + "\n")
    # The committed report also holds entries other scripts write (hamburger.py): keep them.
    committed_path = MODELS / "build-report.json"
    committed = json.loads(committed_path.read_text()) if committed_path.exists() else {}
    report["last_build"] = {"stages": args.stages, "seconds": round(time.time() - build_start),
                            "cpu": cpu_name(), "cores": os.cpu_count()}
    committed.update(report)
    committed_path.write_text(json.dumps(committed, indent=2) + "\n")
    log(f"done in {time.time() - build_start:.0f}s")


if __name__ == "__main__":
    main()
