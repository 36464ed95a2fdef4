#!/usr/bin/env python3
"""Two builds of edgellm side by side: the engine bench's measuring child of build A and of build B
(`target/release/deps/engine-*` of two checkouts) load the same model once each, then run the same
prompt one right after the other, the order alternating, for every prompt in every round. Prints
B / A decode speed and TTFT (median and quartiles over rounds x prompts) and whether the greedy
outputs are identical: how a change to the engine is measured against the commit before it on
this noisy machine, where a single run moves by a third.

  python3 benches/ab.py --a OLD_BENCH_BINARY --b NEW_BENCH_BINARY [--rounds 10] [--mode plain|spec|trust|verify]
"""
import argparse
import json
import pathlib
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def start(binary, model, prompts, new_tokens, extra):
    cmd = [binary, "--child", "--model", str(model), "--provider", "cpu", "--new-tokens", str(new_tokens),
           "--threads", "0", "--weights", "file", "--prompts", prompts, *extra, "--serve"]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(child.stdout.readline())["ready"], cmd
    return child


def run(child, prompt):
    child.stdin.write(f"{prompt}\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())


def quartiles(values):
    v = sorted(values)
    n = len(v)
    return v[n // 4], v[n // 2], v[(3 * n) // 4]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="bench binary of the build before")
    ap.add_argument("--b", required=True, help="bench binary of the build after")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mode", default="plain", choices=["plain", "spec", "trust", "verify"])
    args = ap.parse_args()
    refs = json.loads((ROOT / "tests/reference_outputs.json").read_text())
    prompts = [c["prompt_ids"] for c in refs["models"]["kjv-target"]]
    model, extra = ROOT / "models/kjv-target", []
    if args.mode == "spec":
        extra = ["--draft", str(ROOT / "models/kjv-draft"), "--k", "8"]
    elif args.mode in ("trust", "verify"):
        model, extra = ROOT / "models/kjv-hamburger", ["--multitoken", f"{args.mode}:0.5"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    children = [start(b, model, f.name, args.new_tokens, extra) for b in (args.a, args.b)]
    decode, ttft, same = [], [], [True] * len(prompts)
    for r in range(args.rounds):
        for p in range(len(prompts)):
            replies = [None, None]
            first = (r + p) % 2
            for engine in (first, 1 - first):
                time.sleep(0.01)  # let the other's ONNX Runtime pool stop spinning
                replies[engine] = run(children[engine], p)
            tps = [x["decoded"] / x["decode_s"] for x in replies]
            decode.append(tps[1] / tps[0])
            ttft.append(replies[1]["ttft_s"] / replies[0]["ttft_s"])
            same[p] &= replies[0]["output"] == replies[1]["output"]
    for c in children:
        c.stdin.close()
        c.wait()
    d = quartiles(decode)
    t = quartiles(ttft)
    print(f"{args.mode} on {model.name}, {len(prompts)} prompts x {args.rounds} paired rounds, {args.new_tokens} new tokens:")
    print(f"  decode B/A median {d[1]:.3f} (quartiles {d[0]:.3f}-{d[2]:.3f}); B faster in "
          f"{100 * sum(x > 1 for x in decode) / len(decode):.0f}%")
    print(f"  TTFT   B/A median {t[1]:.3f} (quartiles {t[0]:.3f}-{t[2]:.3f})")
    print(f"  greedy outputs identical on {sum(same)} of {len(same)} prompts")


if __name__ == "__main__":
    main()
