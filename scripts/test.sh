#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian/Ubuntu machine with Rust and Python 3:
# installs what is missing (dbus-daemon, systemd-analyze, ONNX Runtime and the reference
# onnxruntime-genai from PyPI into .edgellm/), then `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/ensure-system-packages.sh
bash scripts/setup-runtime.sh
# The OpenVINO plugin offers devices only where CPUID says Intel: say up front whether its tests
# run natively here or under qemu-x86_64 reporting an Intel CPU (tests/it/fixtures.rs).
.edgellm/venv/bin/python - <<'PY' || true
import onnxruntime as ort, os
plugin = os.path.realpath(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so")
ort.register_execution_provider_library("OpenVINOExecutionProvider", plugin)
devices = [str(d.device.type).split(".")[-1] for d in ort.get_ep_devices() if d.ep_name == "OpenVINOExecutionProvider"]
cpu = next((d.device.vendor for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"), "?")
print(f"test.sh: OpenVINO plugin devices here: {devices or 'none'} (CPU vendor {cpu}); "
      + ("its tests run natively" if "CPU" in devices else "its tests run under qemu-x86_64 as an Intel CPU (a few minutes)"))
PY
# Tests that cannot run what they test here (no AVX-512 VNNI, no qemu-x86_64, not root) list
# themselves in this file (src/skipped.rs); the list is printed at the end, passed or failed.
export EDGELLM_SKIPPED_TESTS="$root/target/skipped-tests.txt"
mkdir -p "$root/target"
rm -f "$EDGELLM_SKIPPED_TESTS"
print_skipped() {
    if [ -s "$EDGELLM_SKIPPED_TESTS" ]; then
        echo "test.sh: $(wc -l < "$EDGELLM_SKIPPED_TESTS") tests skipped what they test on this machine:"
        sort "$EDGELLM_SKIPPED_TESTS" | sed 's/^/  /'
    else
        echo "test.sh: no test skipped what it tests on this machine"
    fi
}
trap print_skipped EXIT
cargo test --locked "$@"
