"""A memory-bound twin of a trained builder-layout decoder: the same function in the size and
shape of a ~0.5 B-parameter Llama, so that decode reads hundreds of MB of int4 weights per token
as on-device models do, while the greedy output stays the trained model's.

- hidden size padded with zeros (384 -> 1536), the head size and the query:KV head ratio kept
  (6:2 -> 24:8); MLP width padded (-> 4096);
- extra layers (-> 24) whose projections are all zero, so each adds nothing to the residual;
- RMSNorm weights rescaled so the original dimensions normalise as before:
  w' = w * sqrt(d/D), eps' = eps * d/D (the padded dimensions are zero);
- MatMulNBits int4 blocks like the original; a padded block has a zero scale and random nibbles:
  it dequantizes to zero whatever its nibbles, and random ones make the memory real. Padded with
  nibbles of 8 (the zero point) instead, ONNX Runtime's copy of the weights was largely untouched
  zero pages: onnxruntime-genai's RSS after 100 tokens was 293 MB for 381 MB of weights, at
  59 tokens/s; with random nibbles 616 MB at 41 tokens/s (2026-12-04, AMD EPYC).

A models/hamburger.py folder (multitoken_config.json) gets the same for its base; its embedder
and micro decoder are unchanged: the base pads inputs_embeds to the twin's width and cuts the
tapped states back to theirs.

Not committed; `models/build.sh --xl` runs it (about 30 seconds a folder, the check included). At
the end it checks that the greedy ids equal the original's on the reference prompts (near-tie
rule), and for a multi-token folder that the base's tapped states and stop logits are the same:

    .edgellm/venv/bin/python models/xl_twin.py models/kjv-target .edgellm/models/kjv-target-xl
    .edgellm/venv/bin/python models/xl_twin.py models/kjv-hamburger .edgellm/models/kjv-hamburger-xl
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# Hidden size, query and KV heads, MLP width, layers; XL_SHAPE="384,6,2,1024,8" (say) makes a
# smaller twin, to check one change at a time.
D, HQ, HKV, INTER, LAYERS = (int(x) for x in os.environ.get("XL_SHAPE", "1536,24,8,4096,24").split(","))


def attr(node, name):
    return next(a for a in node.attribute if a.name == name)


RNG = np.random.default_rng(20261204)


def noise(shape) -> np.ndarray:
    """Random int4 nibbles, for blocks whose zero scale makes them zero."""
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def kind(name: str) -> str:
    """What a MatMulNBits weight is, in the builder's naming (model.layers.N.attn.qkv_proj...)
    and in models/hamburger.py's (base.layers.N.qkv...)."""
    for k, pattern in (("qkv", r"qkv_proj|\.qkv\."), ("o", r"o_proj|\.o\."), ("up", r"gate_proj|up_proj|\.gate\.|\.up\."),
                       ("down", r"down_proj|\.down\."), ("head", r"lm_head|stop\.fc\."), ("keep", r"stop\.out\.")):
        if re.search(pattern, name):
            return k
    raise ValueError(f"xl_twin: no padding rule for the weight {name}")


def pad_matmuls_and_norms(g, inits, new_inits, d, hq, hkv, hs) -> None:
    """Pads every MatMulNBits to the twin's shape (a padded block: zero scale, random nibbles),
    rescales the RMSNorms, and sets the head counts of attention and rotary embedding."""
    scale = math.sqrt(d / D)
    for node in g.node:
        if node.op_type == "MatMulNBits":
            k, n, bs = attr(node, "K").i, attr(node, "N").i, attr(node, "block_size").i
            wname, sname = node.input[1], node.input[2]
            what = kind(wname)
            if what == "keep":  # stop.out reads stop.fc's output, which keeps its width
                continue
            w, s = inits[wname], inits[sname].reshape(n, -1)
            n2 = {"qkv": (HQ + 2 * HKV) * hs, "up": INTER, "head": n}.get(what, D)
            k2 = {"down": INTER, "o": HQ * hs}.get(what, D)
            if what == "qkv":  # where each original output row goes: q, then k, then v
                q, kv = hq * hs, hkv * hs
                rows = np.concatenate([np.arange(q), HQ * hs + np.arange(kv), HQ * hs + HKV * hs + np.arange(kv)])
            else:
                rows = np.arange(n)
            w2 = noise((n2, k2 // bs, bs // 2))
            s2 = np.zeros((n2, k2 // bs), dtype=s.dtype)
            w2[rows, : k // bs] = w.reshape(n, k // bs, bs // 2)
            s2[rows, : k // bs] = s
            new_inits[wname], new_inits[sname] = w2, s2.reshape(-1) if inits[sname].ndim == 1 else s2
            attr(node, "K").i, attr(node, "N").i = k2, n2
        elif node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            wname = node.input[-1] if node.op_type == "SimplifiedLayerNormalization" else node.input[2]
            w2 = np.zeros(D, dtype=inits[wname].dtype)
            w2[:d] = inits[wname] * scale
            new_inits[wname] = w2
            attr(node, "epsilon").f = attr(node, "epsilon").f * d / D
        elif node.op_type == "GroupQueryAttention":
            attr(node, "num_heads").i, attr(node, "kv_num_heads").i = HQ, HKV
        elif node.op_type == "RotaryEmbedding" and any(a.name == "num_heads" for a in node.attribute):
            heads = attr(node, "num_heads")
            heads.i = {hq: HQ, hkv: HKV}.get(heads.i, heads.i)
        elif node.op_type == "Split" and node.input[1].endswith("qkv_sizes"):
            new_inits[node.input[1]] = np.array([HQ * hs, HKV * hs, HKV * hs], dtype=inits[node.input[1]].dtype)


def clone_initializers(node, clone, inits, new_inits, copied) -> None:
    """The initializers of a cloned layer's node: `copied` ones (norms, split sizes) as they are,
    int4 weights as random nibbles (their scales are zero), the rest zero. Shared initializers
    (the rotary caches) keep the one name and copy."""
    for i, o in zip(node.input, clone.input):
        if o != i and (i in new_inits or i in inits):
            arr = new_inits.get(i, inits.get(i))
            new_inits[o] = arr.copy() if copied(i) else noise(arr.shape) if "Q4" in i else np.zeros_like(arr)


def kv_io(values, prefix: str) -> list:
    """The KV inputs or outputs for every layer of the twin, with its KV head count."""
    template = [v for v in values if v.name.startswith(prefix)]
    rest = [v for v in values if not v.name.startswith(prefix)]
    for j in range(LAYERS):
        for kind_ in ("key", "value"):
            v = onnx.ValueInfoProto()
            v.CopyFrom(template[0])
            v.name = f"{prefix}{j}.{kind_}"
            v.type.tensor_type.shape.dim[1].dim_value = HKV
            rest.append(v)
    return rest


def set_kv_io(g) -> None:
    for values in (g.input, g.output):
        prefix = "past_key_values." if values is g.input else "present."
        made = kv_io(list(values), prefix)
        del values[:]
        values.extend(made)


def save(model, inits, new_inits, out: Path, filename: str, inline_below: int = 0) -> None:
    g = model.graph
    # Intermediate shapes recorded at export are the original widths.
    del g.value_info[:]
    del g.initializer[:]
    for name, arr in {**inits, **new_inits}.items():
        g.initializer.append(numpy_helper.from_array(arr, name))
    out.mkdir(parents=True, exist_ok=True)
    for f_ in (filename, filename + ".data"):
        (out / f_).unlink(missing_ok=True)
    onnx.save(model, str(out / filename), save_as_external_data=True, all_tensors_to_one_file=True, location=filename + ".data", size_threshold=inline_below)


def copy_rest(src: Path, out: Path, cfg: dict, done: set[str]) -> None:
    dec = cfg["model"]["decoder"]
    dec.update(hidden_size=D, num_attention_heads=HQ, num_key_value_heads=HKV, num_hidden_layers=LAYERS)
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    for f_ in src.iterdir():
        if f_.name not in done | {"genai_config.json"} and f_.is_file():
            shutil.copy(f_, out / f_.name)


def main(src: Path, out: Path) -> None:
    if (src / "multitoken_config.json").exists():
        return twin_hamburger(src, out)
    cfg = json.loads((src / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    d, hq, hkv, hs, layers = dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]
    assert hq // hkv == HQ // HKV and HQ * hs == D, "the head size and group ratio are kept"
    model = onnx.load(str(src / "model.onnx"))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    new_inits: dict[str, np.ndarray] = {}

    pad_matmuls_and_norms(g, inits, new_inits, d, hq, hkv, hs)
    emb = inits["model.embed_tokens.weight"]
    emb2 = np.zeros((emb.shape[0], D), dtype=emb.dtype)
    emb2[:, :d] = emb
    new_inits["model.embed_tokens.weight"] = emb2

    # Extra layers: copies of the last layer's nodes, renamed, with all-zero weights.
    last = f"layers.{layers - 1}"
    last_nodes = [n for n in g.node if f"/model/{last}/" in n.name]
    final = [n for n in g.node if "final_norm_layernorm" in n.name]
    assert len(final) == 1
    tail = [n for n in g.node if n not in last_nodes and n not in final and "lm_head" in n.name]
    head = [n for n in g.node if n not in last_nodes and n not in final and n not in tail]
    extra = []
    for j in range(layers, LAYERS):
        def rename(x: str, j=j) -> str:
            # One pass: the last layer becomes layer j, and its inputs from the layer before it
            # come from layer j - 1.
            def sub(m: re.Match) -> str:
                i = int(m.group(2))
                return m.group(1) + str(j if i == layers - 1 else j - 1 if i == layers - 2 else i) + m.group(3)
            return re.sub(r"(layers\.|past_key_values\.|present\.)(\d+)([/.])", sub, x)
        for n in last_nodes:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = rename(n.name)
            c.input[:] = [rename(i) for i in n.input]
            c.output[:] = [rename(o) for o in n.output]
            clone_initializers(n, c, inits, new_inits, copied=lambda name: "layernorm" in name)
            extra.append(c)
    f = final[0]
    f.input[0] = f.input[0].replace(f"{last}/", f"layers.{LAYERS - 1}/")
    f.input[1] = f.input[1].replace(f"{last}/", f"layers.{LAYERS - 1}/")
    del g.node[:]
    g.node.extend(head + last_nodes + extra + [f] + tail)

    set_kv_io(g)
    save(model, inits, new_inits, out, "model.onnx")
    copy_rest(src, out, cfg, {"model.onnx", "model.onnx.data"})
    print(f"xl_twin: {out}: {(out / 'model.onnx.data').stat().st_size / 1e6:.0f} MB of weights")
    check_same_function(src, out)


def twin_hamburger(src: Path, out: Path) -> None:
    """The twin of a models/hamburger.py folder: its base padded as above; the embedder and the
    micro decoder unchanged. The base pads the embedder's inputs_embeds to the twin's width and
    gives the tapped states at their original width, so the other two graphs see what they saw."""
    cfg = json.loads((src / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    d, hq, hkv, hs, layers = dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]
    assert hq // hkv == HQ // HKV and HQ * hs == D, "the head size and group ratio are kept"
    filename = dec["filename"]
    model = onnx.load(str(src / filename))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    new_inits: dict[str, np.ndarray] = {}
    pad_matmuls_and_norms(g, inits, new_inits, d, hq, hkv, hs)

    # inputs_embeds (the embedder's width) -> zero-padded to D before the first layer.
    for n in g.node:
        n.input[:] = ["inputs_embeds_wide" if i == "inputs_embeds" else i for i in n.input]
    # Small constants as Constant nodes, which shape inference reads.
    def constant(name: str, values: list[int]):
        return onnx.helper.make_node("Constant", [], [name], name=f"/twin/{name}", value=numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    consts = [constant("twin.embeds_pads", [0, 0, 0, 0, 0, D - d]), constant("twin.states_starts", [0]),
              constant("twin.states_ends", [d]), constant("twin.states_axes", [3])]
    pad = onnx.helper.make_node("Pad", ["inputs_embeds", "twin.embeds_pads"], ["inputs_embeds_wide"], name="/twin/Pad")
    # hidden_states (the tapped states, for the micro decoder) -> back to the original width.
    states = next(n for n in g.node if "hidden_states" in n.output)
    states.output[:] = ["hidden_states_wide"]
    cut = onnx.helper.make_node("Slice", ["hidden_states_wide", "twin.states_starts", "twin.states_ends", "twin.states_axes"],
                                ["hidden_states"], name="/twin/Slice")

    # Extra layers: the last layer's nodes, found by data flow (these node names carry no layer),
    # cloned with all-zero weights between it and the final norm.
    def skip_norm_with(weight: str):
        return next(n for n in g.node if n.op_type == "SkipSimplifiedLayerNormalization" and n.input[2] == weight)
    prefix = next(m.group(1) for n in g.node for i in n.input if (m := re.match(r"(.*layers\.)\d+\.input_norm$", i)))
    enter = skip_norm_with(f"{prefix}{layers - 1}.input_norm")
    final = next(n for n in g.node if n.op_type == "SkipSimplifiedLayerNormalization" and not n.input[2].startswith(prefix))
    produced = set(enter.output) - {""}
    body = []
    for n in list(g.node)[list(g.node).index(enter) + 1:]:
        if n is final:
            break
        if any(i in produced for i in n.input):
            body.append(n)
            produced |= set(n.output) - {""}
    owned = produced | set(enter.output)
    extra = []
    prev = (final.input[0], final.input[1])  # what the next layer's entry norm adds
    for j in range(layers, LAYERS):
        def rename(x: str, j=j) -> str:
            if x in owned and not x.startswith("present."):
                return f"{x}_L{j}"
            return re.sub(rf"^(past_key_values\.|present\.|{re.escape(prefix)}){layers - 1}\.", rf"\g<1>{j}.", x)
        for n in [enter] + body:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{n.name}_L{j}"
            c.input[:] = [rename(i) for i in n.input]
            c.output[:] = [rename(o) if o else o for o in n.output]
            if n is enter:
                c.input[0], c.input[1] = prev
            clone_initializers(n, c, inits, new_inits, copied=lambda name: name.endswith("norm") or name.endswith("qkv_sizes"))
            extra.append(c)
        prev = (rename(final.input[0]), rename(final.input[1]))
    final.input[0], final.input[1] = prev
    nodes = list(g.node)
    at = nodes.index(final)
    del g.node[:]
    g.node.extend(consts + [pad] + nodes[:at] + extra + nodes[at:] + [cut])

    set_kv_io(g)
    # The small tensors inline, as models/hamburger.py wrote them: shape inference reads them.
    save(model, inits, new_inits, out, filename, inline_below=1024)
    copy_rest(src, out, cfg, {filename, filename + ".data"})
    print(f"xl_twin: {out}: {(out / (filename + '.data')).stat().st_size / 1e6:.0f} MB of base weights")
    check_same_function(src, out)


def greedy(folder: Path, prompt: list[int], new: int) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Greedy ids, each step's logits, and (for a multi-token folder) the last step's tapped
    states and stop logits, from plain onnxruntime, the whole sequence a step. A multi-token
    folder's base runs alone, one token per step, its inputs from its embedder."""
    import onnxruntime as ort
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / dec["filename"]), providers=["CPUExecutionProvider"])
    embedder = None
    if (folder / "multitoken_config.json").exists():
        multitoken = json.loads((folder / "multitoken_config.json").read_text())
        embedder = ort.InferenceSession(str(folder / multitoken["embedder"]["filename"]), providers=["CPUExecutionProvider"])
    ids, rows, extra = list(prompt), [], []
    for _ in range(new):
        x = np.array([ids], dtype=np.int64)
        feed = {"attention_mask": np.ones_like(x)}
        if embedder is None:
            feed["input_ids"] = x
        else:
            steps = x.reshape(-1, 1)
            feed["inputs_embeds"] = embedder.run(None, {"step_ids": steps, "step_lengths": np.ones(len(ids), dtype=np.int64)})[0]
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for i in range(dec["num_hidden_layers"]):
            for kind_ in ("key", "value"):
                feed[f"past_key_values.{i}.{kind_}"] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), dtype=np.float32)
        names = ["logits"] + (["hidden_states", "stop_logits"] if embedder is not None else [])
        got = session.run(names, feed)
        row = got[0][0, -1]
        rows.append(row)
        extra = got[1:]
        ids.append(int(row.argmax()))
    return ids[len(prompt):], rows, extra


def check_same_function(src: Path, out: Path, new: int = 16) -> None:
    """The twin's greedy ids equal the original's on the reference prompts; a difference is
    allowed only at a near tie of the original (top-two logit gap < 0.25, as the tests' rule)."""
    refs = json.loads((Path(__file__).resolve().parent.parent / "tests/reference_outputs.json").read_text())
    cases = refs["models"].get(src.name) or refs["models"]["kjv-target"]
    for case in cases:
        want, rows, want_extra = greedy(src, case["prompt_ids"], new)
        got, _, got_extra = greedy(out, case["prompt_ids"], new)
        for name, a, b in zip(("hidden_states", "stop_logits"), want_extra, got_extra):
            # What the micro decoder and the stop rule read: the same values, to float rounding.
            err = float(np.abs(a - b).max() / (np.abs(a).max() + 1e-6))
            assert a.shape == b.shape and err < 1e-3, f"the twin's {name} differ: shape {b.shape} against {a.shape}, relative error {err:.2e}"
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
            top = np.sort(rows[at])[-2:]
            gap = float(top[1] - top[0])
            assert gap < 0.25, f"the twin differs at token {at} of {case['prompt_ids'][:8]}... with a logit gap of {gap:.3f}"
            print(f"xl_twin: a near tie at token {at} (gap {gap:.3f})")
    print(f"xl_twin: greedy ids equal the original's on {len(cases)} reference prompts ({new} tokens each)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
