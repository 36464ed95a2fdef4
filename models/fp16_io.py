#!/usr/bin/env python3
"""Makes a float16-I/O copy of an onnxruntime-genai export, or of a multi-token folder
(multitoken_config.json): the float inputs and outputs a GPU export has in float16 become
float16, with Cast nodes to and from float32 inside, so that the CPU provider can run it. The
engine's float16 path is tested on it.
- a decoder (model.onnx): the KV inputs and outputs and the logits;
- a multi-token folder: every float input and output of its three graphs (the embedder's
  embeddings, the base's embeddings, KV, logits, tapped states and stop logits, the micro
  decoder's features, KV, logits and stop logits).

usage: fp16_io.py SRC_DIR DST_DIR"""
import json
import shutil
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def convert(src: Path, dst: Path, name: str, is_float_io) -> str:
    """`name` of `src` into `dst` with the float inputs and outputs that `is_float_io` picks in
    float16 (Cast nodes to and from float32 inside)."""
    model = onnx.load(str(src / name), load_external_data=True)
    graph = model.graph
    casts_in, casts_out = [], []
    for inp in graph.input:
        if is_float_io(inp.name) and inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            inp.type.tensor_type.elem_type = TensorProto.FLOAT16
            internal = inp.name + "_f32"
            for node in graph.node:
                node.input[:] = [internal if i == inp.name else i for i in node.input]
            casts_in.append(helper.make_node("Cast", [inp.name], [internal], to=TensorProto.FLOAT, name=internal + "_cast"))
    for out in graph.output:
        if is_float_io(out.name) and out.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.type.tensor_type.elem_type = TensorProto.FLOAT16
            internal = out.name + "_f32"
            for node in graph.node:
                node.output[:] = [internal if o == out.name else o for o in node.output]
            casts_out.append(helper.make_node("Cast", [internal], [out.name], to=TensorProto.FLOAT16, name=internal + "_cast"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst / name), save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".data")
    return f"{name}: {len(casts_in)} input and {len(casts_out)} output casts"


def main(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    contract_file = src / "multitoken_config.json"
    if contract_file.exists():
        contract = json.loads(contract_file.read_text())
        graphs = [contract[g]["filename"] for g in ("embedder", "base", "micro")]
        reports = [convert(src, dst, g, lambda n: True) for g in graphs]
        written = set(graphs) | {g + ".data" for g in graphs}
    else:
        kv_or_logits = lambda n: n.startswith(("past_key_values.", "present.")) or n == "logits"
        reports = [convert(src, dst, "model.onnx", kv_or_logits)]
        written = {"model.onnx", "model.onnx.data"}
    for f in src.iterdir():
        if f.name not in written:
            shutil.copy(f, dst / f.name)
    print(f"{dst}: float16 I/O; " + "; ".join(reports))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
