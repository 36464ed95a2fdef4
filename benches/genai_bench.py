#!/usr/bin/env python3
"""onnxruntime-genai's side of `cargo bench --bench engine`: the same prompts, greedy, the same
number of new tokens, in its own process; prints one JSON object on stdout."""
import argparse
import json
import os
import time

import onnxruntime_genai as og


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "openvino"])
    ap.add_argument("--plugin", default="")
    ap.add_argument("--prompts", required=True, help="JSON list of prompt token id lists")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--load-only", action="store_true", help="print the load's time and peak RSS, then exit")
    ap.add_argument("--serve", action="store_true",
                    help="after loading, run the prompt whose index each stdin line gives; one JSON line each")
    ap.add_argument("--threads", type=int, default=-1,
                    help="intra-op threads: 0 is ONNX Runtime's default pool; unset is onnxruntime-genai's default (half the cores)")
    args = ap.parse_args()
    prompts = json.loads(open(args.prompts).read())
    rss_before = rss_kib("VmRSS")
    started = time.perf_counter()
    config = og.Config(args.model)
    if args.threads >= 0:
        # onnxruntime-genai defaults to half the cores; the benchmark sets the same count for both.
        options = {"session_options": {"intra_op_num_threads": args.threads}}
        model_block = {"decoder": options}
        if args.speculative:
            model_block["draft"] = options
        config.overlay(json.dumps({"model": model_block}))
    if os.environ.get("GENAI_PROFILE"):
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"enable_profiling": os.environ["GENAI_PROFILE"]}}}}))
    if args.provider == "openvino":
        og.register_execution_provider_library("OpenVINOExecutionProvider", os.path.realpath(args.plugin))
        config.clear_providers()
        config.append_provider("OpenVINO")
        config.set_provider_option("OpenVINO", "device_type", "CPU")
    model = og.Model(config)
    load_s = time.perf_counter() - started
    # Peak resident memory the load added, before any run; the runs' peak is reported apart.
    rss_load_mib = (rss_kib("VmHWM") - rss_before) / 1024
    def run(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + args.new_tokens)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        out, first = [], None
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        stats = gen.get_speculative_stats() if args.speculative else {}
        return out, first - t0, end - first, stats

    if args.load_only:
        # Ready to serve: the load and the first token of the first prompt (an engine that reads its
        # weights in place pays for them here); the peak resident memory by then.
        run(prompts[0])
        ready_s = time.perf_counter() - started
        print(json.dumps({"load_s": load_s, "rss_load_mib": rss_load_mib, "ready_s": ready_s,
                          "rss_ready_mib": (rss_kib("VmHWM") - rss_before) / 1024}))
        return
    run(prompts[0])  # warm-up
    if args.serve:
        serve(run, prompts)
        return
    results = [run(p) for p in prompts]
    tokens = sum(len(r[0]) for r in results)
    decode_s = sum(r[2] for r in results)
    report = {
        "engine": "onnxruntime-genai",
        "load_s": load_s,
        "rss_load_mib": rss_load_mib,
        "rss_peak_mib": (rss_kib("VmHWM") - rss_before) / 1024,
        "ttft_ms": 1000 * sum(r[1] for r in results) / len(results),
        "decode_tps": sum(len(r[0]) - 1 for r in results) / decode_s,
        "e2e_tps": tokens / sum(r[1] + r[2] for r in results),
        "tokens": tokens,
        "outputs": [r[0] for r in results],
    }
    if args.speculative:
        acc = sum(r[3].get("draft_tokens_accepted", 0) for r in results)
        prop = sum(r[3].get("draft_tokens_evaluated", 0) for r in results)
        fwd = sum(r[3].get("target_forward_passes", 0) for r in results)
        report.update({"acceptance_rate": acc / prop if prop else 0.0, "tokens_per_target_forward": tokens / fwd if fwd else 0.0})
    print(json.dumps(report))


def serve(run, prompts) -> None:
    """The paired table of the bench: it alternates the engines prompt by prompt."""
    print(json.dumps({"ready": True}), flush=True)
    for line in iter(input_line, None):
        out, ttft_s, decode_s, _ = run(prompts[int(line)])
        print(json.dumps({"ttft_s": ttft_s, "decode_s": decode_s, "decoded": len(out) - 1, "output": out}), flush=True)


def input_line():
    try:
        return input()
    except EOFError:
        return None


if __name__ == "__main__":
    main()
