"""The model: load a checkpoint (hub id, folder or built-in), run turns on CPU, one at a time per worker.

engine.py (load, queue, generate), forward.py (the lean Qwen2 forward pass over prepacked weights),
sampling.py (the decode loop: Sampler, run_turn), streaming.py (a generation streamed from a worker
thread), kvpool.py (KV caches kept between turns, keyed by token ids), weights.py (fuse, prepack,
quantize), cpu.py (CPU facts, threads, dtype), builtin.py and builtin_corpus.py (the generated models).

May import: config, memory.hygiene (what runs after each turn), telemetry.labels. It reports through
the listener Protocols it defines (EngineListener, KVListener) and never imports sessions, api or
the rest of telemetry: it knows token ids, not sessions.
"""
