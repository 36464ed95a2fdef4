"""A random-weight Llama big enough that one token's forward is bound by reading its weights.

Not a test model and not committed: the benchmark (`cargo bench --bench engine -- --forward-cost`)
uses it to show how the cost of a forward grows with the number of positions when the weights
(about 170 MB in int4) do not fit in the CPU's caches, against the 13 MB kjv-target that does.
That growth decides what speculative decoding can gain (issue: speculative decoding).

    .edgellm/train/bin/python models/weight_bound.py   # writes .edgellm/weight-bound (~3 minutes)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (same folder; its export and config helpers)

SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4)


def main() -> None:
    out = build.ROOT / ".edgellm" / "weight-bound"
    work = build.ROOT / ".edgellm" / "weight-bound-work"
    work.mkdir(parents=True, exist_ok=True)
    torch = build._torch()
    from transformers import AutoTokenizer, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(build.MODELS / "kjv-target")
    eos_id = tokenizer.convert_tokens_to_ids(build.EOS)
    torch.manual_seed(7)
    model = LlamaForCausalLM(build.llama_config(SHAPE, eos_id))
    params = sum(p.numel() for p in model.parameters())
    build.log(f"weight-bound model: {params / 1e6:.0f}M parameters, random weights")
    build.save_hf(model, tokenizer, work / "hf")
    build.export(work / "hf", out, work, sys.executable)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    build.log(f"{out}: {size / 2**20:.0f} MiB of int4 model files")


if __name__ == "__main__":
    main()
