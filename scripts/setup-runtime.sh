#!/usr/bin/env bash
# Installs ONNX Runtime (CPU) and the OpenVINO plugin from PyPI into a project-local folder:
#   .edgellm/venv      Python environment with onnxruntime, onnxruntime-genai (the reference)
#   .edgellm/runtime   libonnxruntime.so and the OpenVINO plugin, where edgellm looks for them
# Idempotent: does nothing when both are in place. EDGELLM_HOME overrides `.edgellm`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
home=${EDGELLM_HOME:-$root/.edgellm}
venv=$home/venv
runtime=$home/runtime
req=$root/scripts/requirements-runtime.txt

if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
  echo "setup-runtime: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/.requirements"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$runtime"
ort_lib=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.1.* | head -n 1)
ln -sfn "$ort_lib" "$runtime/libonnxruntime.so"
ln -sfn "$site/onnxruntime/capi/libonnxruntime_providers_shared.so" "$runtime/libonnxruntime_providers_shared.so"
ov=$site/onnxruntime_ep_openvino/libonnxruntime_providers_openvino_plugin.so
if [ -e "$ov" ]; then
  ln -sfn "$ov" "$runtime/libonnxruntime_providers_openvino_plugin.so"
fi
echo "setup-runtime: ONNX Runtime at $runtime/libonnxruntime.so -> $(basename "$ort_lib")"
