#!/usr/bin/env bash
# Builds the llama.cpp peer for bench.decode_options and bench.concurrency (llama-bench, llama-batched-bench,
# llama-server, llama-quantize) from the
# llama-cpp-python 0.3.36 sdist (llama.cpp 0c1e57098) and converts builtin:qwen2.5-0.5b-shape to GGUF
# F32/BF16/Q8_0/Q4_K_M. About 15 min on 2 cores. Output: $LLAMACPP_DIR (default
# <tmpdir>/llamacpp-<cpu>) with build/bin/llama-bench and gguf/q05-{f32,bf16,q8_0,q4_k_m}.gguf.
# Usage: PYTHON=.venv/bin/python bench/llamacpp/build.sh   (PYTHON: an interpreter with torch and transformers)
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
py=${PYTHON:-python3}
# a -march=native build only runs on the CPU it was built for: one folder per CPU model and flags
cpu=$(grep -m1 -E "^(model name|flags)" /proc/cpuinfo | md5sum | cut -c1-8)
root=${LLAMACPP_DIR:-$($py -c 'import tempfile;print(tempfile.gettempdir())')/llamacpp-$cpu}
model=${MODEL_DIR:-$HOME/.cache/edgechat/models/builtin-qwen2.5-0.5b-shape}
[ -d "$model" ] || { echo "build the model first: edgechat build-model builtin:qwen2.5-0.5b-shape"; exit 1; }
mkdir -p "$root" && cd "$root"
[ -d llama_cpp_python-0.3.36 ] || { $py -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d . && tar xzf llama_cpp_python-0.3.36.tar.gz; }
src=$root/llama_cpp_python-0.3.36/vendor/llama.cpp
# GCC 12's _tile_loadconfig drops the AMX tile setup (Illegal instruction in Q8_0/Q4_K on AMX CPUs)
(cd "$src" && patch -p1 -N < "$here/amx-tilecfg-fix.patch" || true)
command -v cmake >/dev/null || apt-get install -y -qq cmake g++
cmake -S "$src" -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target llama-bench llama-batched-bench llama-server llama-quantize >/dev/null
# the converter runs on the given interpreter (it needs torch, transformers, safetensors, numpy)
$py -c "import torch, transformers, safetensors, numpy" || { echo "PYTHON=$py lacks torch/transformers"; exit 1; }
# and sentencepiece (imported before it falls back to the BPE vocabulary), kept beside the build
[ -d pydeps/sentencepiece ] || $py -m pip install -q --target pydeps sentencepiece
mkdir -p staged gguf
for f in "$model"/*; do ln -sf "$f" staged/; done
rm -f staged/config.json
$py -c "import json,sys; c=json.load(open(sys.argv[1])); c['architectures']=['Qwen2ForCausalLM']; json.dump(c,open('staged/config.json','w'))" "$model/config.json"
for t in bf16 f32; do
  [ -s gguf/q05-$t.gguf ] || PYTHONPATH=$root/pydeps LLAMA_DIR=$src $py "$here/convert_wrapper.py" staged --outtype $t --outfile gguf/q05-$t.gguf >convert-$t.log 2>&1
done
[ -s gguf/q05-q8_0.gguf ] || build/bin/llama-quantize gguf/q05-bf16.gguf gguf/q05-q8_0.gguf Q8_0 >/dev/null 2>&1
[ -s gguf/q05-q4_k_m.gguf ] || build/bin/llama-quantize gguf/q05-bf16.gguf gguf/q05-q4_k_m.gguf Q4_K_M >/dev/null 2>&1
ls -la gguf
echo "llama-bench: $root/build/bin/llama-bench  gguf: $root/gguf"
