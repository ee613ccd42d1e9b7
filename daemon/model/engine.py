"""The model engine: load a model and tokenizer, serve many generations at once (continuous batching) behind a
bounded queue."""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Protocol, Sequence

from .builtin import ensure_built, is_builtin, read_marker
from ..config import Config
from .cpu import cpu_has_bf16, physical_cores, resolve_dtype, set_threads
from . import kernels, tune
from .forward import make_decoder
from .sampling import Sampler, sampling_for
from .tokens import TokenTable
from .streaming import (Generation, GenerationFailed, GenerationParams, GenerationShed, GenerationStats,
                        plain_text_mask)
from ..memory.hygiene import Hygiene, rss_bytes
from .admission import Admission, AdmissionListener, EngineBusy
from .kvpool import KVListener, KVPool
from .scheduler import BatchListener, Scheduler
from .sequence import Sequence as Running
from . import counting

__all__ = ["Engine", "EngineBusy", "EngineListener", "ModelLoadError", "ContextTooLong", "Generation",
           "GenerationFailed", "GenerationParams", "GenerationShed", "GenerationStats", "cpu_has_bf16",
           "physical_cores", "resolve_dtype"]

_LOG = logging.getLogger("edgechat.engine")
_WARMUP = [{"role": "user", "content": "Hello!"}]


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message names the setting and the offline way out."""

    def __init__(self, model: str, cause: BaseException) -> None:
        reason = " ".join(str(cause).split()).rstrip(".")  # one line, whatever the library wrote
        super().__init__(
            f"cannot load model {model!r} (setting `model`, env EDGECHAT_MODEL, flag --model): "
            f"{type(cause).__name__}: {reason}. For a model that needs no download, use "
            f"`--model builtin:tiny`.")


class ContextTooLong(ValueError):
    """The prompt leaves no room for a single new token in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(f"prompt of {prompt_tokens} tokens does not fit the context of {context_length}")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class EngineListener(KVListener, AdmissionListener, BatchListener, Protocol):
    """Observer of the waiting line, the batch's steps and the KV pool (metrics)."""


class Engine:
    """One model and tokenizer; generate() admits a generation into the batch (bounded waiting line) and
    streams it; one scheduler thread steps every running generation together."""

    def __init__(self, cfg: Config, model: Any, tokenizer: Any, *, model_id: str, dtype: str,
                 plain_text_only: bool, listener: EngineListener | None = None,
                 log: logging.Logger = _LOG, memory_pressure: Callable[[], bool] | None = None,
                 choice: tune.Choice | None = None) -> None:
        self.cfg = cfg
        if choice is None:  # built directly (tests): what the settings force, else the decoder's default
            choice = tune.Choice(dtype, "none" if cfg.quantize == "auto" else cfg.quantize,
                                 "" if cfg.kernel == "auto" else cfg.kernel)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.dtype = dtype
        self.leak_mode = cfg.leak_mode
        self.load_seconds = 0.0
        self.ready = False
        self.retained: list = []
        self._log = log
        self._hygiene = Hygiene(cfg.gc_after_turn, cfg.malloc_trim_after_turn, log)
        self._closed = False
        config = model.config
        limits = [x for x in (getattr(config, "max_position_embeddings", None),
                              getattr(tokenizer, "model_max_length", None))
                  if isinstance(x, int) and 0 < x < 10**9]  # tokenizers say 1e30 for "no limit"
        self.context_length = min(limits) if limits else 2048
        self.eos_ids = self._eos_ids()
        self._generation_config = copy.deepcopy(model.generation_config)
        rows = model.get_input_embeddings().weight.shape[0]
        self._banned = plain_text_mask(tokenizer, rows, self.eos_ids) if plain_text_only else None
        self.decoder = make_decoder(model, choice.quantize, choice.kernel if choice.kernel not in ("", "hf") else None)
        if choice.prefill_rows and hasattr(self.decoder, "step_rows"):  # the tuner's crossover on this CPU
            self.decoder.step_rows = max(self.decoder.step_rows, choice.prefill_rows)
        self.quantize = choice.quantize
        self.kernel = getattr(self.decoder, "kernel", "hf")
        describe = getattr(self.decoder, "describe", None)  # FastDecoder's; the HF path has nothing to add
        # and where the compiled kernels came from (packaged, built, unavailable, off): a per-op step with
        # them unavailable is the slow path EdgechatDecodeSlowPath reports
        self.decode_path: dict = {**(describe() if describe else {}), "compiled": kernels.state()}
        lib = getattr(getattr(self.decoder, "_step", None), "lib", None)
        self._argmax = kernels.argmaxer(lib) if lib is not None else None  # greedy rows' token, compiled
        self.choice = choice
        # leak mode "tensors" keeps every turn's cache itself; a pool would only hide that
        budget = cfg.kv_cache_bytes if cfg.leak_mode != "tensors" else 0
        self.kv_pool = KVPool(budget, listener, memory_pressure)
        self._admission = Admission(cfg.max_batch, cfg.queue_limit, self.kv_pool, listener)
        self._scheduler = Scheduler(self.decoder, self.kv_pool, self._admission, hygiene=self._hygiene,
                                    prefill_chunk=cfg.prefill_chunk, log=log, listener=listener)
        self._warming = False
        self._tokens: TokenTable | None = None
        self.last_count: counting.Count | None = None  # the latest count (tests, benchmarks)

    @classmethod
    def load(cls, cfg: Config, *, listener: EngineListener | None = None, log: logging.Logger = _LOG,
             memory_pressure: Callable[[], bool] | None = None) -> "Engine":
        """Load cfg.model (building builtin:* models first), set threads, warm up; ModelLoadError if it cannot.

        memory_pressure: asked after each turn; True drops every kept KV cache.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        threads = set_threads(cfg.threads)
        try:
            path = ensure_built(cfg.model, cfg.cache_dir, log=log.info) if is_builtin(cfg.model) else cfg.model
            tokenizer = AutoTokenizer.from_pretrained(path)
            model_config = AutoConfig.from_pretrained(path)
            choice = tune.for_config(cfg, path, model_config, threads, log.info)
            dtype = choice.dtype
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # OSError: missing path, offline and not cached, unreadable files; ValueError/KeyError:
            # unknown builtin name or architecture, malformed config; RuntimeError: a failed build.
            raise ModelLoadError(cfg.model, exc) from exc
        model.eval()
        plain = is_builtin(cfg.model) or read_marker(path) is not None
        try:
            engine = cls(cfg, model, tokenizer, model_id=cfg.served_name, dtype=dtype, plain_text_only=plain,
                         listener=listener, log=log, memory_pressure=memory_pressure, choice=choice)
        except ValueError as exc:  # quantize asked of a model the fast decoder does not support
            raise ModelLoadError(cfg.model, exc) from exc
        log.info("loaded model %s from %s: %s%s, %s decoder (%s kernel, %s; %s), %d threads, context %d, KV "
                 "cache budget %.0f MB, in %.1f s, RSS %.0f MB", cfg.model, path, dtype,
                 "" if engine.quantize == "none" else f" with {engine.quantize} weights",
                 type(engine.decoder).__name__, engine.kernel, choice.source,
                 ", ".join(f"{k} {v}" for k, v in engine.decode_path.items()), threads, engine.context_length,
                 engine.kv_pool.budget_bytes / 2**20, time.monotonic() - started, rss_bytes() / 2**20)
        if cfg.leak_mode == "tensors":
            log.warning("LEAK MODE 'tensors' IS ON: every turn's generation outputs (KV cache, scores) are "
                        "kept in memory on purpose. Memory WILL grow until the process dies. Demo/test only.")
        if cfg.warmup:
            engine._warm_up()
        engine.load_seconds = time.monotonic() - started
        engine.ready = True
        return engine

    def _eos_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def _warm_up(self) -> None:
        started = time.monotonic()
        self._warming = True  # the warm-up conversation is nobody's prefix: no KV pool, no counts
        try:
            gen = self.generate(_WARMUP, GenerationParams(max_new_tokens=4, temperature=0.0))
            for _ in gen:
                pass
        finally:
            self._warming = False
        self.retained.clear()  # leak mode counts the served turns only
        self._log.info("warm-up: %d tokens in %.2f s", gen.stats.completion_tokens if gen.stats else 0,
                       time.monotonic() - started)

    def _prompt_text(self, messages: Sequence[dict], tools: list[dict] | None = None,
                     generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, messages: Sequence[dict], tools: list[dict] | None = None, *,
               generation_prompt: bool = True) -> list[int]:
        """Prompt ids: the chat template (tools rendered by it) with the assistant turn opened."""
        text = self._prompt_text(messages, tools, generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: Sequence[dict], tools: list[dict] | None = None, *,
                     limit: int | None = None) -> int:
        """Prompt length of these messages as the model would see them; past `limit`, a number over
        it (a lower bound), found without tokenizing the whole prompt (model/counting.py)."""
        return self.count_text(self._prompt_text(messages, tools), limit=limit)

    def count_text(self, text: str, *, limit: int | None = None) -> int:
        """Tokens of a text as is (no template, no special tokens added), bounded like count_tokens."""
        found = counting.count(self._count_text, text, limit)
        self.last_count = found
        return found.tokens

    def _count_text(self, text: str) -> int:
        # the Rust encoding's length: no Python list of ids (and no attention mask) built to be counted
        if self.tokenizer.is_fast:
            return len(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def give_back_memory(self) -> float:
        """The after-turn hygiene step (gc, malloc_trim) on demand, e.g. after refusing large work."""
        return self._hygiene()

    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return self._admission.counts()[0]

    def in_progress(self) -> int:
        """Generations in the batch now (at most max_batch)."""
        return self._admission.counts()[1]

    def batch(self) -> dict:
        """The batch as /readyz and /v1/stats show it: places, running and waiting, KV bytes by owner, and
        the steps that only decoded by generations in them (since start: the decode rate at each size)."""
        waiting, running = self._admission.counts()
        decode = {str(n): {"steps": steps, "seconds": round(seconds, 6), "tokens_per_s": round(n * steps / seconds, 2)}
                  for n, (steps, seconds) in sorted(self._scheduler.decode_steps.items()) if seconds > 0}
        return {"max_batch": self.cfg.max_batch, "running": running, "waiting": waiting,
                "kv_budget_bytes": self.kv_pool.budget_bytes, "kv_running_bytes": self.kv_pool.held_bytes,
                "kv_idle_bytes": self.kv_pool.bytes_held, "decode_steps": decode}

    def shed(self, keep: int = 1) -> int:
        """Cancel the newest generations, keeping the `keep` oldest (memory pressure); how many go."""
        return self._scheduler.shed(keep)

    @property
    def dtype_label(self) -> str:
        """The dtype as edgechat_model_info shows it: "bfloat16", or "bfloat16+int8" for int8 weights
        ("+int4" for int4)."""
        return self.dtype if self.quantize == "none" else f"{self.dtype}+{self.quantize}"

    @property
    def vocab_rows(self) -> int:
        """Rows of the output layer: every valid token id is below this (the lean decoder keeps the
        count: the model's own tables may be freed)."""
        return getattr(self.decoder, "vocab_rows", None) or self.model.get_input_embeddings().weight.shape[0]

    def token_table(self) -> TokenTable:
        """Each token id's bytes (built on first use: constrained decoding and logprobs need it)."""
        if self._tokens is None:
            self._tokens = TokenTable(self.tokenizer, self.vocab_rows, self._banned)
        return self._tokens

    def release_caches(self) -> int:
        """Drop every KV cache kept between turns (memory watchdog); returns the bytes they held."""
        return self.kv_pool.release()

    def generate(self, messages: Sequence[dict] | str, params: GenerationParams,
                 tools: list[dict] | None = None, *,
                 on_end: Callable[[], None] | None = None) -> Generation:
        """Wait for a place in the batch (bounded), then generate; iterate the result for text deltas.

        messages: a conversation for the chat template, or one text when params.raw_prompt.
        on_end runs once the generation has ended and left the batch (not when this raises)."""
        if self._closed:
            raise RuntimeError("engine is closed")
        prompt_ids = (self.tokenizer(messages, add_special_tokens=False)["input_ids"] if params.raw_prompt
                      else self.encode(messages, tools))
        max_new = min(params.max_new_tokens, self.cfg.max_new_tokens, self.context_length - len(prompt_ids))
        if max_new < 1:
            raise ContextTooLong(len(prompt_ids), self.context_length)
        sampling = sampling_for(params, max_new, self._generation_config, self.cfg.min_new_tokens)
        constraint = params.constraint() if params.constraint is not None else None
        logprobs: list | None = [] if params.top_logprobs is not None else None
        sampler = Sampler(sampling, self.eos_ids, self._banned, prompt_ids, constraint, logprobs, params.seed,
                          self._argmax)
        kv_bytes = self.decoder.kv_bytes(len(prompt_ids) + max_new)
        waited = self._admission.enter(kv_bytes, self.cfg.queue_timeout_s)
        try:
            gen = Generation(self.tokenizer, prompt_ids, tuple(params.stop), self.eos_ids,
                             timeout_s=self.cfg.generation_timeout_s, queue_wait_s=waited,
                             started=time.monotonic(), logprobs=logprobs, on_end=on_end)
            self._scheduler.submit(Running(gen, sampler, max_new, kv_bytes, use_pool=self.kv_pool.enabled and not self._warming,
                                           retain=self.retained if self.leak_mode == "tensors" else None))
        except BaseException:
            self._admission.leave(kv_bytes)
            raise
        return gen

    def close(self) -> None:
        """Refuse new work, cancel every generation (waiting for them) and drop the model."""
        self._closed = True
        self.ready = False
        self._admission.close()
        self._scheduler.close()
        self.retained.clear()
        self.kv_pool.release()
        self.model = self.tokenizer = self.decoder = None
        self._hygiene()
