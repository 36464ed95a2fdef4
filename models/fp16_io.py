#!/usr/bin/env python3
"""Makes a float16-I/O copy of an onnxruntime-genai export: the KV inputs and outputs and the
logits become float16 (as CUDA and GPU exports have them), with Cast nodes to and from float32
inside, so that the CPU provider can run it. The engine's float16 path is tested on it.

usage: fp16_io.py SRC_DIR DST_DIR"""
import json
import shutil
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def main(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    model = onnx.load(str(src / "model.onnx"), load_external_data=True)
    graph = model.graph
    casts_in, casts_out = [], []
    for inp in graph.input:
        if inp.name.startswith("past_key_values.") and inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            inp.type.tensor_type.elem_type = TensorProto.FLOAT16
            internal = inp.name + "_f32"
            for node in graph.node:
                node.input[:] = [internal if i == inp.name else i for i in node.input]
            casts_in.append(helper.make_node("Cast", [inp.name], [internal], to=TensorProto.FLOAT, name=internal + "_cast"))
    for out in graph.output:
        if (out.name.startswith("present.") or out.name == "logits") and out.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.type.tensor_type.elem_type = TensorProto.FLOAT16
            internal = out.name + "_f32"
            for node in graph.node:
                node.output[:] = [internal if o == out.name else o for o in node.output]
            casts_out.append(helper.make_node("Cast", [internal], [out.name], to=TensorProto.FLOAT16, name=internal + "_cast"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    for f in src.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(f, dst / f.name)
    print(f"{dst}: float16 KV and logits, {len(casts_in)} input and {len(casts_out)} output casts")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
