#!/usr/bin/env bash
# Makes edgellm's test models from scratch on CPU (48 minutes on a 2-core AMD EPYC):
# installs Debian's bible-kjv (the corpus) and the pinned Python packages into .edgellm/train,
# then runs models/build.py. Extra arguments go to build.py (e.g. --stages reference).
# `models/build.sh --hamburger [ARGS]` instead makes models/kjv-hamburger from kjv-target as of
# commit 4f5e589 (models/hamburger.py, about 50 minutes), then its reference outputs.
# `models/build.sh --xl` makes .edgellm/models/kjv-target-xl and kjv-hamburger-xl, the memory-bound
# twins of kjv-target and kjv-hamburger, and kjv-speculative-xl, the pair with kjv-draft for
# onnxruntime-genai (models/xl_twin.py: about a minute on a 2-core AMD EPYC, the checks included;
# not committed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "${1:-}" = "--xl" ]; then
  bash scripts/setup-runtime.sh >/dev/null
  .edgellm/venv/bin/python models/xl_twin.py models/kjv-target .edgellm/models/kjv-target-xl
  .edgellm/venv/bin/python models/xl_twin.py models/kjv-hamburger .edgellm/models/kjv-hamburger-xl
  # onnxruntime-genai's folder of the speculative pair (kjv-draft drafting for the twin), for the
  # bench's speculative rows.
  pair=.edgellm/models/kjv-speculative-xl
  rm -rf "$pair" && mkdir -p "$pair"
  ln -s ../kjv-target-xl "$pair/target"
  ln -s "$root/models/kjv-draft" "$pair/draft"
  ln -s target/tokenizer.json "$pair/tokenizer.json"
  exec .edgellm/venv/bin/python - "$pair" <<'PY'
import json, sys
pair = sys.argv[1]
config = json.load(open("models/kjv-speculative/genai_config.json"))
twin = json.load(open(pair + "/target/genai_config.json"))["model"]["decoder"]
for key in ("head_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads"):
    config["model"]["decoder"][key] = twin[key]
json.dump(config, open(pair + "/genai_config.json", "w"), indent=4)
print(f"xl: {pair}: onnxruntime-genai's speculative pair")
PY
fi
if ! command -v bible >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null
fi
venv=$root/.edgellm/train
if ! cmp -s models/requirements.txt "$venv/.requirements" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r models/requirements.txt
  cp models/requirements.txt "$venv/.requirements"
fi
if [ "${1:-}" = "--hamburger" ]; then
  shift
  "$venv/bin/python" models/hamburger.py "$@"
  exec "$venv/bin/python" models/multitoken_reference.py
fi
exec "$venv/bin/python" models/build.py "$@"
