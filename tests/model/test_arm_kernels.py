"""The aarch64 kernels, checked without ARM hardware: cross-compiled with Debian's g++-aarch64-linux-gnu and
run under qemu-user-static, without the dot-product instructions (Cortex-A53: NEON) and with them (qemu's
`max` CPU: SDOT), on every weight kind, against references computed here on x86 (float64, with the int8
quantization of x the interleaved kinds use); the x86 kernels meet the same references."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess

import pytest
import torch

from daemon.model import kernels
from daemon.model.kernels import build, fused
from daemon.model.quant import quantize_groups8, quantize_int4, quantize_rows
from support import REPO_ROOT

pytestmark = pytest.mark.timeout(300)

CROSS = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64-static"
DRIVER = REPO_ROOT / "tests" / "model" / "kernels_driver.cpp"
# (qemu -cpu, the ISA level the kernels must detect there): 1 NEON, 2 NEON + SDOT (asimddp)
CPUS = [("cortex-a53", 1), ("max", 2)]
N, M = 40, 5  # 40 rows: the last 16-row block is half full; 5 rows of x: a tile of 4 and one more
K_ROWS, K_GROUPS = 100, 96  # bf16/fp32/int8 rows take any K (100: a tail past the 16-wide loop); groups of 32
QUANTIZED = ("int8", "int4", "int8g", "int4v")
CASES = [(kind, False) for kind in fused.KINDS] + [(kind, True) for kind in QUANTIZED]  # True: outlier columns


def _tools() -> tuple[str, str]:
    found = shutil.which(CROSS), shutil.which(QEMU)
    if None in found:
        message = f"needs {CROSS} and {QEMU} (Debian: g++-aarch64-linux-gnu, qemu-user-static; make test-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _round_half_even(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)  # torch rounds half to even, as nearbyint and vcvtnq do


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """step.cpp's quantize_x in fp32: per 32, q = round(x * (127 / amax)), dx = amax / 127, xs = sum x."""
    g = x.view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = _round_half_even(g * inv[..., None])
    return q.double(), (amax / torch.tensor(127.0)).double(), g.sum(-1).double()


class Case:
    """One linear: its tensors as the kernels read them, and the reference y [M, N] in float64."""

    def __init__(self, kind: str, outliers: bool, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.name = kind, f"{kind}{'-outliers' if outliers else ''}"
        self.k = K_ROWS if kind in ("bf16", "f32", "int8") else K_GROUPS
        w = torch.randn(N, self.k, generator=gen) * 0.02
        self.x = torch.randn(M, self.k, generator=gen)
        if kind == "bf16":  # as in a bf16 model: x holds bf16 values (the AVX512-BF16 kernel rounds x to them)
            self.x = self.x.bfloat16().float()
        self.bias = torch.randn(N, generator=gen) * 0.1
        self.idx = torch.randperm(self.k, generator=gen)[:3].sort().values.to(torch.int32) if outliers else None
        self.outw = None
        xz = self.x.clone()
        if outliers:  # three input columns computed apart in fp32, zero in the quantized weight
            self.outw = (w[:, self.idx.long()] * 30).T.contiguous()
            w[:, self.idx.long()] = 0
            xz[:, self.idx.long()] = 0
        self.weights, deq, y = self._pack(w, xz)
        self.deq = deq
        if outliers:
            deq[:, self.idx.long()] = self.outw.T.double()
            y = y + self.x[:, self.idx.long()].double() @ self.outw.double()
        self.ref = y + self.bias.double()

    def _pack(self, w: torch.Tensor, xz: torch.Tensor) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """(what the kernel reads, the dequantized weight, y without bias and outliers)."""
        x = xz.double()
        if self.kind in ("bf16", "f32"):
            t = w.to(torch.bfloat16 if self.kind == "bf16" else torch.float32).contiguous()
            return (t,), t.double(), x @ t.double().T
        if self.kind == "int8":
            q, s = quantize_rows(w, torch.float32)
            deq = q.double() * s.double()[:, None]
            return (q, s.float()), deq, x @ deq.T
        qx, dx, xs = quantize_x(xz)
        if self.kind == "int8g":
            q, s = quantize_groups8(w)
            qg, sg = q.double().view(N, -1, 32), s.double()
            y = torch.einsum("ngk,mgk,ng,mg->mn", qg, qx, sg, dx)
            return fused.pack_int8g(q, s), (qg * sg[..., None]).view(N, -1), y
        packed, s, mn = quantize_int4(w)
        # a group's 16 bytes: low nibbles elements 0..15, high nibbles 16..31
        qg = torch.cat(((packed & 15).view(N, -1, 16), (packed >> 4).view(N, -1, 16)), -1).double()
        sg, mg = s.double(), mn.double()
        deq = (qg * sg[..., None] + mg[..., None]).view(N, -1)
        if self.kind == "int4":  # x in fp32: the exact product
            return (packed, s, mn), deq, x @ deq.T
        y = torch.einsum("ngk,mgk,ng,mg->mn", qg, qx, sg, dx) + torch.einsum("ng,mg->mn", mg, xs)
        return fused.pack_int4v(packed, s, mn), deq, y

    def lin(self) -> fused.Lin:
        outliers = None if self.idx is None else (self.idx, self.outw)
        return fused.lin(self.kind, self.weights, self.bias, N, self.k, outliers)

    def write(self, folder: str) -> str:
        tensors = {"w": self.weights[0], "s": self.weights[1] if len(self.weights) > 1 else None,
                   "z": self.weights[2] if len(self.weights) > 2 else None, "bias": self.bias, "idx": self.idx,
                   "outw": self.outw, "x": self.x}
        for ext, t in tensors.items():
            with open(os.path.join(folder, f"{self.name}.{ext}"), "wb") as handle:
                if t is not None:
                    handle.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        n_out = 0 if self.idx is None else self.idx.numel()
        return f"{self.name} {fused.KINDS[self.kind]} {N} {self.k} {M} {n_out} 1\n"


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return [Case(kind, outliers, seed) for seed, (kind, outliers) in enumerate(CASES)]


@pytest.fixture(scope="module")
def driver(cases, tmp_path_factory) -> tuple[str, str]:
    """The driver cross-compiled for aarch64 (static: qemu-user needs no sysroot) and the case folder."""
    cross, _ = _tools()
    work = tmp_path_factory.mktemp("arm")
    with open(work / "cases.txt", "w", encoding="utf-8") as handle:
        handle.writelines(case.write(str(work)) for case in cases)
    binary = str(work / "driver")
    flags = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")]  # the library's, as a program
    done = subprocess.run([cross, *flags, "-static", f'-DEDGECHAT_SOURCE_HASH="{build.source_hash()}"',
                           "-I", build.HERE, "-o", binary, str(DRIVER)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return binary, str(work)


def test_the_library_build_command_cross_compiles_for_aarch64(tmp_path):
    """build.py's own command (what `pip wheel` runs on an ARM box) with the cross compiler: an aarch64
    library exporting the entry points."""
    cross, _ = _tools()
    out = str(tmp_path / build.LIBRARY)
    build.compile_library(out, cross)
    with open(out, "rb") as handle:
        header = handle.read(20)
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == 183  # EM_AARCH64
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", out], capture_output=True, text=True, timeout=60).stdout
    for name in ("edgechat_gemv_lin", "edgechat_dequantize", "edgechat_batch_step", "edgechat_best_isa",
                 "edgechat_has_vnni", "edgechat_source_hash"):
        assert re.search(rf"\s{name}$", symbols, re.M), name
    disassembly = shutil.which("aarch64-linux-gnu-objdump")
    if disassembly:  # SDOT only inside the functions gated on asimddp (a Cortex-A53 would trap on it)
        text = subprocess.run([disassembly, "-d", "--no-show-raw-insn", out], capture_output=True, text=True,
                              timeout=120).stdout
        where, owners = "", set()
        for line in text.splitlines():
            if line.endswith(">:"):
                where = line.split("<", 1)[1]
            elif "\tsdot\t" in line:
                owners.add(where.split("I", 1)[0])
        assert owners == {"_Z11blocks_sdot"}, owners


@pytest.mark.parametrize("cpu,isa", CPUS, ids=[c for c, _ in CPUS])
def test_kernels_under_qemu_match_the_x86_references(driver, cases, cpu, isa):
    binary, work = driver
    _, qemu = _tools()
    done = subprocess.run([qemu, "-cpu", cpu, binary, work], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert first == f"best_isa={isa} source_hash={build.source_hash()}", first
    for case in cases:
        scale = case.ref.abs().max().item()
        for level in range(isa + 1):
            for what in ("gemv", "rows") if case.idx is None else ("gemv",):
                got = _read(work, f"{case.name}.{what}.{level}", (M, N))
                torch.testing.assert_close(got, case.ref, rtol=1e-4, atol=1e-4 * scale,
                                           msg=lambda m: f"{case.name} {what} isa {level} on {cpu}: {m}")
            if case.idx is None:  # a row of x alone gets the same bits as beside four others
                assert torch.equal(_read(work, f"{case.name}.one.{level}", (M, N)),
                                   _read(work, f"{case.name}.rows.{level}", (M, N))), f"{case.name} isa {level}"
        if case.kind in QUANTIZED:
            deq = _read(work, f"{case.name}.deq", (N, case.k))
            torch.testing.assert_close(deq, case.deq, rtol=1e-6, atol=1e-7, msg=lambda m: f"{case.name} deq: {m}")


def test_the_x86_kernels_meet_the_same_references(cases, tmp_path):
    lib = kernels.load(str(tmp_path))
    assert lib is not None
    for case in cases:
        if case.kind in ("int8g", "int4v") and not lib.vnni:
            continue  # the interleaved kinds run on AVX512-VNNI only on x86
        lin, out = case.lin(), torch.empty(M, N)
        for level in range(lib.isa + 1):
            lib.lib.edgechat_gemv_lin(ctypes.byref(lin), case.x.data_ptr(), out.data_ptr(), M, level, 1)
            torch.testing.assert_close(out.double(), case.ref, rtol=1e-4, atol=1e-4 * case.ref.abs().max().item(),
                                       msg=lambda m: f"{case.name} isa {level}: {m}")


def _read(folder: str, name: str, shape: tuple[int, int]) -> torch.Tensor:
    with open(os.path.join(folder, name), "rb") as handle:
        data = bytearray(handle.read())
    return torch.frombuffer(data, dtype=torch.float32).view(shape).double()
