"""Decode tokens/s of a wheel install with no compiler against this editable checkout, same run, same model.

Builds edgechat's sdist and, from it, the wheel (the compiled kernels inside) as deploy/Dockerfile's
builder stage does; installs the wheel into a fresh venv that reuses this venv's packages (torch is not
downloaded again); then, per precision, starts two children on builtin:qwen2.5-0.5b-shape — this
checkout (kernels built at first start into a scratch cache) and the wheel install (PATH without a
compiler: its packaged library or nothing) — and alternates them round by round (who goes first
alternates too), a few greedy tokens after a 32-token prompt each time: short, many rounds, so that a
shared machine's load, which moves by the second, falls alike on both sides. Prints each side's median tok/s and
the median of the per-round ratios wheel / checkout, and whether the two libraries are the same bytes
(they should be: one command, no -march, deterministic).

    .venv/bin/python -m bench.install_speed [--rounds 25] [--tokens 16] [--quantize none,int8,int4]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from . import common

PROMPT = 32
CONTEXT = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "daemon")
# A child: load the kernels and the model, say where they came from, then one decode timing per stdin line.
CHILD = r"""
import json, sys, time
import torch
import daemon
from daemon.model import kernels
from daemon.model.builtin import ensure_built
from daemon.model.cpu import physical_cores
from daemon.model.forward import FastDecoder
from transformers import AutoModelForCausalLM
model_cache, kernel_cache, quantize, new, prompt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(physical_cores())
lib = kernels.load(kernel_cache, log=lambda line: print(line, file=sys.stderr))
path = ensure_built("builtin:qwen2.5-0.5b-shape", model_cache, log=lambda *a: None)
decoder = FastDecoder(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), quantize,
                      "native" if lib else None)
print(json.dumps({"daemon": daemon.__file__, "compiled": kernels.state(), "isa": lib.label if lib else None,
                  "library": lib.path if lib else None, **decoder.describe()}), flush=True)
ids = list(range(1000, 1000 + prompt))
for _ in sys.stdin:
    with torch.inference_mode():
        state = decoder.new_state()
        token = int(torch.argmax(decoder.forward(ids, state)))
        started = time.perf_counter()
        for _ in range(new):
            token = int(torch.argmax(decoder.forward([token], state)))
        print(json.dumps({"decode": new / (time.perf_counter() - started)}), flush=True)
"""


def build_wheel(workdir: str) -> str:
    """sdist of the checkout's build context, then the wheel from it (with this venv's setuptools)."""
    src = os.path.join(workdir, "src")
    os.makedirs(src)
    for name in CONTEXT:
        source = os.path.join(common.REPO, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(source, src)
    sdist = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_sdist(sys.argv[1]))", os.path.join(workdir, "dist")],
                           cwd=src, capture_output=True, text=True, check=True).stdout.split()[-1]
    wheels = os.path.join(workdir, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-cache-dir", "--wheel-dir", wheels, os.path.join(workdir, "dist", sdist)], check=True)
    return os.path.join(wheels, os.listdir(wheels)[0])


def install(wheel: str, workdir: str) -> str:
    """A venv holding the wheel, with this venv's site-packages after its own (a .pth line); its bin/."""
    venv = os.path.join(workdir, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "bench-venv.pth"), "w", encoding="utf-8") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    "--no-cache-dir", wheel], check=True)
    return os.path.join(venv, "bin")


def spawn(python: str, env: dict, kernel_cache: str, quantize: str, tokens: int,
          cwd: str) -> tuple[subprocess.Popen, dict]:
    child = subprocess.Popen([python, "-c", CHILD, common.default_cache_dir(), kernel_cache, quantize, str(tokens),
                              str(PROMPT)], cwd=cwd, env=env, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    said = json.loads(child.stdout.readline() or "{}")
    if "daemon" not in said:
        common.stop_process(child, 30)
        raise RuntimeError(f"{python} failed to load the model")
    return child, said


def ask(child: subprocess.Popen) -> float:
    child.stdin.write("run\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())["decode"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens timed per measurement")
    parser.add_argument("--quantize", default="none,int8,int4", help="comma-separated: none, int8, int4")
    args = parser.parse_args(argv)
    common.exit_on_sigterm()
    base = {**common.clean_env(), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    base.pop("PYTHONPATH", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgechat-install-speed-") as workdir:
        wheel = build_wheel(workdir)
        bin_dir = install(wheel, workdir)
        no_compiler = {**{k: v for k, v in base.items() if k not in ("CXX", "CC")}, "PATH": bin_dir}
        assert not [c for c in ("g++", "c++", "clang++") if shutil.which(c, path=bin_dir)]
        print(f"wheel {os.path.basename(wheel)}; {common.machine_note()}; {common.code_note()}", file=sys.stderr)
        for quantize in args.quantize.split(","):
            sides = {}
            try:
                sides["checkout"] = spawn(sys.executable, base, os.path.join(workdir, "kernels"), quantize,
                                          args.tokens, common.REPO)
                sides["wheel"] = spawn(os.path.join(bin_dir, "python"), no_compiler, os.path.join(workdir, "none"),
                                       quantize, args.tokens, workdir)
                for name, (_, said) in sides.items():
                    print(f"  {quantize} {name}: {said}", file=sys.stderr)
                speeds: dict[str, list[float]] = {"checkout": [], "wheel": []}
                for r in range(args.rounds):
                    order = ["checkout", "wheel"] if r % 2 == 0 else ["wheel", "checkout"]
                    for name in order:
                        speeds[name].append(ask(sides[name][0]))
                    print(f"  {quantize} round {r + 1}: checkout {speeds['checkout'][-1]:.1f} tok/s, "
                          f"wheel {speeds['wheel'][-1]:.1f} tok/s", file=sys.stderr)
            finally:
                for child, _ in sides.values():
                    child.stdin.close()
                    common.stop_process(child, 30)
            ratios = [w / c for w, c in zip(speeds["wheel"], speeds["checkout"])]
            libraries = [said["library"] for _, said in sides.values()]
            same = None not in libraries and filecmp.cmp(*libraries, shallow=False)
            rows.append([quantize, sides["wheel"][1]["compiled"], sides["wheel"][1]["step"], sides["wheel"][1]["isa"],
                         "yes" if same else "no",
                         f"{common.median(speeds['checkout']):.1f}", f"{common.median(speeds['wheel']):.1f}",
                         f"{common.median(ratios):.3f}", f"{min(ratios):.3f}–{max(ratios):.3f}"])
    print(common.markdown_table(["weights", "wheel: compiled", "step", "isa", "same library bytes", "checkout tok/s",
                                 "wheel tok/s",
                                 "wheel / checkout (median)", "per-round range"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
