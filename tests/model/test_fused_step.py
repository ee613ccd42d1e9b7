"""The one-call decode step (step.cpp): the per-op path's logits, its interleaved layouts, its threads."""
from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch
import torch.nn.functional as F

from daemon.model import kernels
from daemon.model.forward import FastDecoder
from daemon.model.kernels import fused
from daemon.model.pages import HUGE, huge_copy
from daemon.model.quant import dequantize_int4, quantize_groups8, quantize_int4, split_outliers
from daemon.model.weights import Streamed


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    built = kernels.load(str(tmp_path_factory.mktemp("kernels")))
    assert built is not None, "the kernels did not build"
    return built


@pytest.fixture(params=[True, False], ids=["vnni", "rows"])
def vnni(request, lib, monkeypatch):
    """The interleaved AVX512-VNNI kernels, and gemv.cpp's row kernels (what other CPUs run)."""
    if request.param and not lib.vnni:
        pytest.skip("this CPU has no AVX512-VNNI")
    chosen = dataclasses.replace(lib, vnni=request.param)
    monkeypatch.setattr(kernels, "current", lambda: chosen)
    return request.param


def _model(dtype=torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def _decode(decoder, fused_step: bool, n: int = 40) -> torch.Tensor:
    if not fused_step:
        decoder._step = None
    ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    state = decoder.new_state()
    out = [decoder.forward(ids[:5], state)] + [decoder.forward([t], state) for t in ids[5:]]
    return torch.stack(out)


@pytest.mark.parametrize("quantize,dtype", [("none", torch.bfloat16), ("none", torch.float32),
                                            ("int8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_one_call_step_gives_the_per_op_logits(vnni, quantize, dtype):
    """The same weights decoded by step.cpp in one call and op by op through torch agree (the step keeps
    activations in fp32 where the per-op path rounds them to the model's dtype)."""
    one = FastDecoder(_model(dtype), quantize, "native")
    assert one._step is not None
    per_op = FastDecoder(_model(dtype), quantize, "native")
    got, ref = _decode(one, True), _decode(per_op, False)
    floor = 0.999999 if dtype == torch.float32 else 0.999
    assert F.cosine_similarity(got, ref, dim=-1).min() > floor
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_threads_split_rows_not_results(lib):
    """One thread or two: every row and every head is computed whole by one thread, so bit for bit the same."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _decode(FastDecoder(_model(), "int8", "native"), True)
        torch.set_num_threads(2)
        two = _decode(FastDecoder(_model(), "int8", "native"), True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("kind", ["int8g", "int4v"])
def test_interleaved_weights_hold_the_rows(lib, kind):
    """Packed 16 rows wide (N not a multiple of 16), outlier columns apart: the compiled dequantization
    gives back the row-major weight exactly, and one row of x through the kernel gives x @ W^T."""
    if not lib.vnni:
        pytest.skip("this CPU has no AVX512-VNNI")
    torch.manual_seed(1)
    w = torch.randn(100, 256) * 0.02
    w[:, [7, 200]] *= 40
    rest, outliers = split_outliers(w)
    assert outliers is not None and sorted(outliers[0].tolist()) == [7, 200]
    if kind == "int8g":
        q, scales = quantize_groups8(rest)
        deq = (q.float().view(100, 8, 32) * scales.float()[..., None]).view(100, 256)
        f = Streamed(lib, "int8g", fused.pack_int8g(q, scales), None, 100, outliers=outliers)
    else:
        packed, scales, mins = quantize_int4(rest)
        deq = dequantize_int4(packed, scales, mins, torch.float32)
        f = Streamed(lib, "int4v", fused.pack_int4v(packed, scales, mins), None, 100, outliers=outliers)
    deq[:, outliers[0].long()] = outliers[1].t()
    torch.testing.assert_close(f.dequantized(torch.float32), deq, rtol=0, atol=0)
    x = torch.randn(1, 256)
    # x goes in as int8 per 32 values: the result is x @ W^T to about 1 % of its scale
    err = (f(x) - x @ deq.T).abs().max() / (x @ deq.T).abs().max()
    assert err < 0.02


def test_tied_lm_head_serves_the_embedding_rows(vnni):
    """No second table: the kernels' lm_head copy answers the row lookups — exactly the model's rows, or
    the rows its int8 weights stand for — in prefill (torch) and in the one-call step alike."""
    model = _model()
    table = model.model.embed_tokens.weight.detach().clone()
    decoder = FastDecoder(model, "none", "native")
    assert decoder.embed is None and not model.model.embed_tokens.weight.numel()
    ids = torch.tensor([0, 5, 999])
    assert torch.equal(decoder._embed(ids), table[ids])
    quantized = FastDecoder(_model(), "int8", "native")
    assert quantized.lm_head.kind == ("int8g" if vnni else "int8")
    rows = quantized.lm_head.dequantized(torch.float32)[ids]
    torch.testing.assert_close(quantized._embed(ids).float(), rows, rtol=0.01, atol=1e-3)
    one, per_op = _decode(quantized, True, n=6), _decode(FastDecoder(_model(), "int8", "native"), False, n=6)
    assert F.cosine_similarity(one, per_op, dim=-1).min() > 0.999
    with pytest.raises(IndexError):
        decoder.forward([1000], decoder.new_state())


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")
def test_huge_copy_is_aligned_equal_and_given_back():
    src = torch.randn(3 * HUGE // 4 + 5)  # not a whole number of huge pages
    t = huge_copy(src)
    addr = t.data_ptr()
    assert addr % HUGE == 0 and torch.equal(t, src)
    assert huge_copy(torch.ones(10)).data_ptr() % 64 == 0  # small: a plain copy
    del t
    gc.collect()
    assert not _mapped(addr)


@pytest.mark.parametrize("rows", [1, 7, 8, 17, 40, 70])
def test_amx_int8_sums_are_vnnis_bit_for_bit(lib, rows):
    """From AMX_ROWS rows of x int8 weights run on AMX tiles: exact int32 sums and VNNI's epilogue, so any
    number of rows gives every row what VNNI gives it."""
    if lib.isa < kernels.ISA_NAMES.index("amx_bf16") or not lib.vnni:
        pytest.skip("this CPU has no AMX")
    torch.manual_seed(rows)
    w = torch.randn(100, 256) * 0.05
    packed = fused.pack_int8g(*quantize_groups8(w))
    x = torch.randn(rows, 256)
    out = {}
    for isa in (2, lib.isa):
        out[isa] = torch.empty(rows, 100)
        kernels.gemv(dataclasses.replace(lib, isa=isa), "int8g", packed, None, x, out[isa])
    assert torch.equal(out[2], out[lib.isa])
    assert F.cosine_similarity(out[lib.isa], x @ w.T, dim=-1).min() > 0.999


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 65])
def test_amx_bf16_gives_each_row_what_it_gets_alone(lib, rows):
    """bf16 weights on AMX tiles (whole blocks of 16 rows of W; the rest on AVX512-BF16): a row of x gets the
    same sums alone or beside others, and the rows match a float reference."""
    if lib.isa < kernels.ISA_NAMES.index("amx_bf16"):
        pytest.skip("this CPU has no AMX")
    torch.manual_seed(rows)
    w = torch.randn(37, 128).to(torch.bfloat16)  # 2 whole blocks of 16 and 5 rows past them
    x = torch.randn(rows, 128)
    many = torch.empty(rows, 37)
    kernels.gemv(lib, "bf16", (w,), None, x, many)
    alone = torch.empty(1, 37)
    kernels.gemv(lib, "bf16", (w,), None, x[-1:].contiguous(), alone)
    assert torch.equal(alone[0], many[-1])
    torch.testing.assert_close(many, x.to(torch.bfloat16).float() @ w.float().T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [1, 17, 1000, 151936])
def test_compiled_argmax_is_torchs_with_the_banned_at_minus_infinity(lib, n):
    """Greedy rows pick their token with edgechat_argmax: the same index as torch's, ties (the first), NaN
    (the first NaN wins) and everything banned (0) included."""
    argmax = kernels.argmaxer(lib)
    g = torch.Generator().manual_seed(n)
    for trial in range(24):
        x = torch.randn(n, generator=g)
        if trial % 4 == 1:
            x[torch.randint(0, n, (1,), generator=g)] = x.max()  # a tie for the top
        if trial % 6 == 2 and n > 3:
            x[n // 2] = float("nan")
        banned = torch.rand(n, generator=g) < (0.0, 0.3, 1.0)[trial % 3]
        assert argmax(x, banned) == int(torch.argmax(x.masked_fill(banned, float("-inf"))))
        assert argmax(x, None) == int(torch.argmax(x))
