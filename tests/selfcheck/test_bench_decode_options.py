"""bench.decode_options' own tables: every variant runs a known decoder and says what it is, and the
ratios to llama.cpp use the peer's runs from the same rounds."""
from __future__ import annotations

from types import SimpleNamespace

from bench import decode_options as bench


def test_every_variant_is_described_and_runs_a_known_path():
    assert set(bench.WHAT) == set(bench.VARIANTS)
    for name, (dtype, how, threads) in bench.VARIANTS.items():
        assert dtype in ("bfloat16", "float32") and threads >= 0
        assert how in bench.DECODERS or how in ("generate", "hf"), name
    assert bench.REFERENCE in bench.VARIANTS


def test_ratios_use_the_same_round_peer_runs():
    config = SimpleNamespace(vocab_size=1000, hidden_size=64, tie_word_embeddings=True, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    rounds = {"lean-native-int8": {"prefill": [500.0, 520.0, 510.0], "decode": [100.0, 110.0, 105.0],
                                   "ref_decode": [50.0] * 3, "rss": [900 * 2**20], "weight_bytes": 525e6,
                                   "peer": [{"prefill": 340.0, "decode": 50.0, "bytes": 525e6},
                                            {"prefill": 360.0, "decode": 70.0, "bytes": 525e6},
                                            {"prefill": 350.0, "decode": 60.0, "bytes": 525e6}]}}
    # the four GGUFs at the end met a faster window: the same-round runs are what the ratio divides by
    at_end = {"int8": {"prefill": 999.0, "decode": 999.0, "bytes": 525e6}}
    row = bench.table(rounds, config, at_end).splitlines()[-1].strip("| ").split(" | ")
    assert row[-4:] == ["Q8_0", "×1.75", "×1.46", "×1.75"]  # 105/60, 510/350, same bytes
    assert row[5:8] == ["525", "55.1", "900"]  # MB read per token, GB/s, RSS MB
