"""Bytes a decoder reads per generated token: every initializer of its MatMul/MatMulNBits nodes
(int4 blocks, scales, zero points) and of its norms. The embedding table is not counted: a
token reads one row of it. Also what ONNX Runtime's CPU kernel reads instead: MLAS repacks an
int8-compute (accuracy_level 4) MatMulNBits into the int4 blocks, a copy of the scales and a
float block sum per block (by our reading of MLAS's packed layout), so it reads one more
scale-sized array than the model holds. Also the number of int4 weights (N x K summed over the
MatMulNBits nodes). Prints JSON: {"per_token_bytes": N, "mlas_bytes": N, "file_bytes": N,
"int4_weights": N}.

    .edgellm/venv/bin/python benches/weight_bytes.py MODEL_DIR
"""
import json
import os
import sys

import onnx


def tensor_bytes(t):
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data)


def main():
    folder = sys.argv[1]
    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    read = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "MatMul", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            read.update(i for i in node.input if i in sizes)
    block_sums = 0
    int4_weights = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            shape = {a.name: a.i for a in node.attribute if a.name in ("N", "K")}
            int4_weights += shape.get("N", 0) * shape.get("K", 0)
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type == "MatMulNBits" and level == 4 and len(node.input) > 2 and node.input[2] in sizes:
            block_sums += sizes[node.input[2]]
    data = os.path.join(folder, "model.onnx.data")
    per_token = sum(sizes[n] for n in read)
    print(json.dumps({"per_token_bytes": per_token, "mlas_bytes": per_token + block_sums,
                      "file_bytes": os.path.getsize(data) if os.path.exists(data) else 0,
                      "int4_weights": int4_weights}))


if __name__ == "__main__":
    main()
