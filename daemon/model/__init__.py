"""The model: load a checkpoint (hub id, folder or built-in), run many turns at once on CPU, batched.

engine.py (load, admit, generate), scheduler.py (the one thread that owns the model: continuous
batching), admission.py and sequence.py (who joins the batch, and a running sequence's state),
forward.py (the lean Qwen2 forward pass over prepacked weights), sampling.py (Sampler: a row's next
token), streaming.py (a generation's consumer handle), kvpool.py (the KV budget: running caches and
those kept between turns, keyed by token ids), weights.py (fuse, prepack, quantize), cpu.py (CPU
facts, threads, dtype), builtin.py and builtin_corpus.py (the generated models).

May import: config, memory.hygiene (what runs after each turn), telemetry.labels. It reports through
the listener Protocols it defines (EngineListener, KVListener) and never imports sessions, api or
the rest of telemetry: it knows token ids, not sessions.
"""
