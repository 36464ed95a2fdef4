"""A variant of a MatMulNBits model for the forward-cost measurements: another `accuracy_level`
(4: int8 compute; 0-2: float compute) and/or another block size (its blocks re-quantized from
the model's own: the function moves by the re-quantization error, so a variant is for timing,
not for output checks). Zero-scale blocks (xl_twin.py's padding) stay zero-scale with random
nibbles. Not committed; the bench's --forward-cost takes the folders it writes:

    .edgellm/venv/bin/python models/xl_variant.py SRC DST [--accuracy-level N] [--block-size N]
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import onnx
from onnx import numpy_helper


def attr(node, name):
    return next(a for a in node.attribute if a.name == name)


def dequantize(packed: np.ndarray, scales: np.ndarray, n: int, k: int, bs: int) -> np.ndarray:
    """[N, K] float32 of `packed` [N, K/bs, bs/2] nibbles (low first) with zero point 8."""
    low, high = packed & 0x0F, packed >> 4
    nibbles = np.stack([low, high], axis=-1).reshape(n, k // bs, bs).astype(np.float32) - 8.0
    return (nibbles * scales.reshape(n, k // bs, 1)).reshape(n, k)


def quantize(w: np.ndarray, bs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    blocks = w.reshape(n, k // bs, bs)
    scales = np.abs(blocks).max(axis=-1) / 7.0
    safe = np.where(scales == 0, 1.0, scales)
    nibbles = (np.clip(np.rint(blocks / safe[..., None]), -8, 7) + 8).astype(np.uint8)
    # Zero-scale blocks: random nibbles, as xl_twin.py writes them.
    zero = scales == 0
    nibbles[zero] = rng.integers(0, 16, size=(int(zero.sum()), bs), dtype=np.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed, scales.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--accuracy-level", type=int)
    parser.add_argument("--block-size", type=int)
    args = parser.parse_args()
    model = onnx.load(os.path.join(args.src, "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(7)
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if args.accuracy_level is not None:
            attr(node, "accuracy_level").i = args.accuracy_level
        if args.block_size is not None and args.block_size != attr(node, "block_size").i:
            k, n, bs = attr(node, "K").i, attr(node, "N").i, attr(node, "block_size").i
            assert len(node.input) < 4 or not node.input[3], "zero points are not handled"
            w_t, s_t = inits[node.input[1]], inits[node.input[2]]
            w = dequantize(numpy_helper.to_array(w_t), numpy_helper.to_array(s_t).astype(np.float32), n, k, bs)
            packed, scales = quantize(w, args.block_size, rng)
            w_t.CopyFrom(numpy_helper.from_array(packed, w_t.name))
            s_shape = (n, k // args.block_size) if len(s_t.dims) == 2 else (n * (k // args.block_size),)
            s_t.CopyFrom(numpy_helper.from_array(scales.reshape(s_shape).astype(numpy_helper.to_array(s_t).dtype), s_t.name))
            attr(node, "block_size").i = args.block_size
    os.makedirs(args.dst, exist_ok=True)
    onnx.save(model, os.path.join(args.dst, "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    for name in os.listdir(args.src):
        if not name.startswith("model.onnx"):
            shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
    print(f"xl_variant: {args.dst}: accuracy_level {args.accuracy_level}, block size {args.block_size}")


if __name__ == "__main__":
    main()
