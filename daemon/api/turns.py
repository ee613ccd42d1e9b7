"""Run one generation for a view: queue errors, streaming as SSE, cleanup on disconnect, metrics."""
from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from typing import Callable, Iterator

from flask import Response

from ..model.engine import ContextTooLong, EngineBusy, GenerationParams, GenerationShed
from ..services import Services, get_services
from .errors import ApiError, error_body, invalid
from . import params, validate
from .limits import tenant

log = logging.getLogger("edgechat.api")

# finish_reason/timeout -> the `outcome` label of edgechat_turns_total
def outcome_of(stats) -> str:
    """The turns_total outcome for finished generation stats."""
    if stats is None:
        return "error"
    if stats.timed_out:
        return "timeout"
    return {"stop": "ok", "length": "length", "cancelled": "cancelled",
            "shed": "cancelled"}.get(stats.finish_reason, "error")


def sampling_params(body: dict, *, allow_stop: bool, legacy: bool = False,
                    default_max: int | None = None) -> GenerationParams:
    """GenerationParams from a request body, validated against the server's caps.

    legacy: /v1/completions (logprobs is a count there)."""
    services = get_services()
    cap = services.config.max_new_tokens
    max_new = validate.max_tokens(body, cap)
    if default_max is not None and body.get("max_tokens") is None:
        max_new = min(default_max, cap)
    repetition = validate.number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    return GenerationParams(
        max_new_tokens=max_new,
        temperature=validate.number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=validate.number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=validate.stop_list(body) if allow_stop else (),
        seed=validate.integer(body, "seed", None, 0, 2**63 - 1),
        top_k=validate.top_k(body),
        min_p=validate.number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=repetition if body.get("repetition_penalty") is not None else None,
        presence_penalty=validate.number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=validate.number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=validate.logit_bias(body, services.engine.vocab_rows),
        top_logprobs=validate.top_logprobs(body, legacy=legacy),
    )


def read_request(table, name: str) -> tuple[dict, Services]:
    """The JSON body of a generation route, checked against its fate table and the served model."""
    services = get_services()
    body = validate.json_body()
    params.check(body, table, name, services.config)
    check_model(body)
    return body, services


def check_model(body: dict) -> None:
    """`model`, when sent, must name the served model (its served name or the `model` setting)."""
    services = get_services()
    model, served = body.get("model"), services.engine.model_id
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model", "invalid_type")
    if model not in (None, "", served, services.config.model):
        raise ApiError(404, f"model {model[:200]!r} is not served here; GET /v1/models lists "
                            f"{served!r}", code="model_not_found", param="model")


def count_prompt(messages: list[dict], tools: list[dict] | None = None) -> int:
    """The prompt's tokens; past the model's context, a lower bound over it (tokenized in part)."""
    engine = get_services().engine
    return engine.count_tokens(messages, tools, limit=engine.context_length)


def count_text(text: str) -> int:
    """A raw prompt's tokens, bounded the same way."""
    engine = get_services().engine
    return engine.count_text(text, limit=engine.context_length)


def check_context(prompt_tokens: int, params: GenerationParams, param: str = "messages") -> None:
    """400 context_length_exceeded when prompt plus requested tokens cannot fit the model."""
    limit = get_services().engine.context_length
    if prompt_tokens + params.max_new_tokens > limit:
        get_services().recorder.on_reject("prompt_too_long")
        has = f"{prompt_tokens}" if prompt_tokens <= limit else f"more than {limit}"
        raise invalid(f"this model's context is {limit} tokens; the prompt has {has} and "
                      f"{params.max_new_tokens} more were requested", param,
                      "context_length_exceeded")


def start(messages: list[dict] | str, params: GenerationParams, tools: list[dict] | None = None):
    """Take one of the caller's turn slots (429 when it has them all), then the model (bounded
    queue) and start generating; 503 + Retry-After when saturated or when the memory watchdog
    refuses turns (above the hard memory limit)."""
    services = get_services()
    pressure = services.watchdog
    if pressure is not None and not pressure.admits_turn():
        services.recorder.on_reject("memory_pressure")
        raise ApiError(503, f"short of memory ({pressure.describe()}); new turns are refused until "
                            "memory falls back; retry later", code="memory_pressure",
                       retry_after=pressure.retry_after_s)
    try:
        release = services.limits.hold(tenant())
    except ApiError:
        services.recorder.on_reject("too_many_in_flight")
        raise
    try:  # from here the slot is the generation's: it frees it when it ends (on_end)
        return services.engine.generate(messages, params, tools, on_end=release)
    except EngineBusy as busy:
        release()
        services.recorder.on_reject(busy.reason)
        raise ApiError(503, f"the model is busy ({busy.reason.replace('_', ' ')}); retry later",
                       code=busy.reason, retry_after=busy.retry_after) from None
    except ContextTooLong as err:  # the engine's own last check (check_context normally comes first)
        release()
        raise invalid(str(err), "messages", "context_length_exceeded") from None
    except BaseException:
        release()
        raise


def observe(gen, services: Services, *, turn: int, history_messages: int | None) -> None:
    """Record a finished (or abandoned) generation in the metrics and refresh the sampled gauges.

    Takes the Services explicitly: streamed bodies finish outside the app context.
    """
    stats = gen.stats
    if stats is None:
        services.metrics.turns_total.labels(outcome="error").inc()
        return
    services.recorder.observe_turn(turn=turn, outcome=outcome_of(stats), duration_s=stats.duration_s,
                   ttft_s=stats.ttft_s, completion_tokens=stats.completion_tokens,
                   prompt_tokens=stats.prompt_tokens, queue_wait_s=stats.queue_wait_s,
                   history_messages=history_messages)
    services.sampler.refresh(max_age_s=1.0)  # sub-second turns share one refresh; the sampler and scrapes keep gauges fresh


def shed_error(shed: GenerationShed) -> ApiError:
    """503 memory_pressure for a generation the memory watchdog cancelled mid-way (retry later)."""
    return ApiError(503, f"{shed}; retry later", code="memory_pressure", retry_after=shed.retry_after)


def drain(gen) -> str:
    """Run a generation to the end without streaming."""
    try:
        for _ in gen:
            pass
    except GenerationShed as shed:
        raise shed_error(shed) from None
    return gen.text


def run_stateless(gen, services: Services) -> str:
    """Drain a generation no session holds, close it and observe it (also when draining fails)."""
    try:
        return drain(gen)
    finally:
        gen.close()
        observe(gen, services, turn=1, history_messages=None)


def sse(data) -> str:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def stream(gen, stack: ExitStack, *, turn: int, head: list[dict], delta: Callable[[str], list[dict]],
           tail: Callable[[object], list[dict]]) -> Response:
    """Stream a generation as SSE; the ExitStack (session lock, generation) closes on any exit.

    `delta` turns each text piece into the events to send now (none while text is held back).

    `tail` runs once the generation finished: it commits, observes metrics and returns the last
    events. A stream that ends any other way (disconnect, error) is observed here, uncommitted.
    """
    stack.callback(gen.close)
    services = get_services()
    state = {"committed": False, "closed": False}

    def cleanup() -> None:
        if state["closed"]:
            return
        state["closed"] = True
        stack.close()
        if not state["committed"]:
            observe(gen, services, turn=turn, history_messages=None)

    def events() -> Iterator[str]:
        try:
            for event in head:
                yield sse(event)
            for piece in gen:
                if piece:
                    for event in delta(piece):
                        yield sse(event)
            last = tail(gen)
            state["committed"] = True
            for event in last:
                yield sse(event)
            yield sse("[DONE]")
        except GeneratorExit:
            # the client went away mid-stream: stop generating, commit nothing
            gen.cancel()
            raise
        except GenerationShed as shed:  # the memory watchdog took it back: a final error event, no commit
            err = shed_error(shed)
            yield sse(error_body(err.status, err.message, err.code))
        except ApiError as err:  # a refusal known only at the end (session gone, store down)
            state["committed"] = True  # observed by whoever raised it
            log.info("stream ended with %s: %s", err.code, err.message)
            yield sse(error_body(err.status, err.message, err.code, err.param))
        except Exception:  # noqa: BLE001 - the status line is sent; tell the client in-band
            log.exception("stream failed")
            yield sse(error_body(500, "generation failed", "internal_error"))
        finally:
            cleanup()

    resp = Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # if the body is never iterated (client gone before the first byte) close still frees the lock
    resp.call_on_close(cleanup)
    return resp


def now() -> int:
    """Unix seconds, as OpenAI's `created`."""
    return int(time.time())
