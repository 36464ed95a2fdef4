#!/usr/bin/env python3
"""Reference loop for HAMburger-style multi-token models, in Python with onnxruntime over the
same three graphs the engine runs (models/kjv-hamburger), written from the contract alone.

Writes tests/multitoken_reference.json: for the prompts of tests/reference_outputs.json, the
greedy token ids of the trust loop at a few thresholds, with the number of base forwards and KV
entries, so that the engine's own loop is checked against an independent implementation.

Run with the runtime venv (scripts/setup-runtime.sh):
  .edgellm/venv/bin/python models/multitoken_reference.py [OUT.json]
The tests run it themselves into a temporary file: near ties of the model resolve differently on
another CPU's kernels, so the committed file is the record, and this machine's run the reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "kjv-hamburger"
NEW_TOKENS = 64
THRESHOLDS = [0.7, 0.5, 1.0]


class Hamburger:
    def __init__(self, folder: Path):
        self.contract = json.loads((folder / "multitoken_config.json").read_text())
        genai = json.loads((folder / "genai_config.json").read_text())
        self.eos = genai["model"]["eos_token_id"]
        self.eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        dec = genai["model"]["decoder"]
        self.layers, self.kv_heads, self.head = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        opts = ort.SessionOptions()
        load = lambda name: ort.InferenceSession(str(folder / self.contract[name]["filename"]), opts,
                                                 providers=["CPUExecutionProvider"])
        self.embedder, self.base, self.micro = load("embedder"), load("base"), load("micro")
        m = self.contract["micro"]
        self.micro_layers, self.micro_heads, self.micro_head = m["num_hidden_layers"], m["num_key_value_heads"], m["head_size"]

    def empty(self, layers, heads, head):
        return {f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, head), np.float32)
                for i in range(layers) for k in ("key", "value")}

    def embed(self, steps):
        width = max(len(s) for s in steps)
        ids = np.zeros((len(steps), width), np.int64)
        for r, s in enumerate(steps):
            ids[r, :len(s)] = s
        lengths = np.array([len(s) for s in steps], np.int64)
        return self.embedder.run(["inputs_embeds"], {"step_ids": ids, "step_lengths": lengths})[0]

    def base_step(self, past, steps, positions):
        embeds = self.embed(steps)
        total = past["past_key_values.0.key"].shape[2] + len(steps)
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.array([positions], np.int64), **past}
        names = [o.name for o in self.base.get_outputs()]
        out = dict(zip(names, self.base.run(None, feeds)))
        new_past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        return out["logits"][0, -1], out["hidden_states"][0, -1], float(out["stop_logits"][0, -1]), new_past

    def micro_step(self, past, features, token):
        feeds = {"features": features[None].astype(np.float32), "input_ids": np.array([[token]], np.int64), **past}
        names = [o.name for o in self.micro.get_outputs()]
        out = dict(zip(names, self.micro.run(None, feeds)))
        new_past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        return out["logits"][0], float(out["stop_logits"][0]), new_past

    @staticmethod
    def goes_on(stop_logit, threshold):
        return threshold < 1.0 and 1.0 - 1.0 / (1.0 + np.exp(-stop_logit)) >= threshold

    def trust(self, prompt, threshold, max_step, new_tokens):
        """Greedy trust loop; returns (tokens, base forwards, KV entries)."""
        past = self.empty(self.layers, self.kv_heads, self.head)
        logits, feats, stop, past = self.base_step(past, [[t] for t in prompt], list(range(len(prompt))))
        forwards, seq, out = 1, list(prompt), []
        while True:
            token = int(np.argmax(logits))
            step = [token]
            out.append(token); seq.append(token)
            if token in self.eos:  # kept in the output, as onnxruntime-genai's references do
                return out, forwards, past["past_key_values.0.key"].shape[2]
            if len(out) >= new_tokens:
                return out, forwards, past["past_key_values.0.key"].shape[2]
            go_on = max_step > 1 and self.goes_on(stop, threshold)
            micro_past = self.empty(self.micro_layers, self.micro_heads, self.micro_head)
            f = feats
            while go_on and len(step) < max_step:
                mlogits, mstop, micro_past = self.micro_step(micro_past, f, token)
                f = np.zeros((0, feats.shape[-1]), np.float32)
                token = int(np.argmax(mlogits))
                step.append(token)
                out.append(token); seq.append(token)
                if token in self.eos:
                    return out, forwards, past["past_key_values.0.key"].shape[2]
                if len(out) >= new_tokens:
                    return out, forwards, past["past_key_values.0.key"].shape[2]
                go_on = self.goes_on(mstop, threshold)
            # the step goes in as one embedding at the position of its last token
            logits, feats, stop, past = self.base_step(past, [step], [len(seq) - 1])
            forwards += 1


def main():
    refs = json.loads((ROOT / "tests" / "reference_outputs.json").read_text())
    prompts = refs["models"]["kjv-target"]
    model = Hamburger(MODEL)
    max_step = model.contract["max_tokens_per_step"]
    out = {"model": "kjv-hamburger", "new_tokens": NEW_TOKENS, "generator": "models/multitoken_reference.py (onnxruntime, greedy, trust)",
           "max_tokens_per_step": max_step, "cases": []}
    for threshold in THRESHOLDS:
        for case in prompts:
            ids, forwards, kv = model.trust(case["prompt_ids"], threshold, max_step, NEW_TOKENS)
            out["cases"].append({"prompt": case["prompt"], "prompt_ids": case["prompt_ids"], "threshold": threshold,
                                 "output_ids": ids, "base_forwards": forwards, "kv_entries": kv})
        done = [c for c in out["cases"] if c["threshold"] == threshold]
        tps = sum(len(c["output_ids"]) for c in done) / sum(c["base_forwards"] for c in done)
        print(f"threshold {threshold}: {tps:.2f} tokens per base forward", file=sys.stderr)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "multitoken_reference.json"
    target.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
