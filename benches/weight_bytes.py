"""Bytes a decoder reads per generated token: every initializer of its MatMul/MatMulNBits nodes
(int4 blocks, scales, zero points) and of its norms. The embedding table is not counted: a
token reads one row of it. Prints JSON: {"per_token_bytes": N, "file_bytes": N}.

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
    data = os.path.join(folder, "model.onnx.data")
    print(json.dumps({"per_token_bytes": sum(sizes[n] for n in read), "file_bytes": os.path.getsize(data) if os.path.exists(data) else 0}))


if __name__ == "__main__":
    main()
