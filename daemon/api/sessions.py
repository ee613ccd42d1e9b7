"""Server-side conversations under the bounded history policy: /v1/sessions."""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from flask import Blueprint, g, jsonify

from ..services import Services, get_services
from ..sessions import ContextTooLong, SessionBusy, SessionNotFound, StoreFailure
from . import logprobs, params, turns, validate
from .auth import protect
from .errors import ApiError, invalid, store_unavailable
from .openapi import documented

bp = protect(Blueprint("sessions", __name__, url_prefix="/v1/sessions"))
KEYED = "api_key"
log = logging.getLogger("edgechat.api")


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, f"no session {session_id!r} (unknown, expired, or not yours)",
                    code="session_not_found", param="id")


def _tokens(err: ContextTooLong) -> str:
    """The count a refusal quotes: exact, or "more than N" when counting stopped early."""
    context = get_services().engine.context_length
    return str(err.tokens) if err.tokens <= context else f"more than {context}"


def _publish_stats(services: Services) -> None:
    """Best effort: the gauges are refreshed by housekeeping too, and a turn already committed
    must not be answered with an error because a read of the stats failed."""
    try:
        services.recorder.set_store_stats(services.store.stats())
    except StoreFailure as exc:
        log.warning("session stats not refreshed: %s", exc)


@bp.post("")
@documented(table=params.SESSION_CREATE, status=201, auth=KEYED)
def create():
    """Start a conversation, optionally with a system prompt."""
    body = validate.json_body()
    params.check(body, params.SESSION_CREATE, "sessions", get_services().config)
    system = validate.text(body, "system", required=False)
    services = get_services()
    try:
        snap = services.store.create(g.owner, system)
    except ContextTooLong as err:
        services.recorder.on_reject("prompt_too_long")
        raise invalid(f"the system prompt needs {_tokens(err)} tokens with a message; the history "
                      f"budget is {err.limit}, so no turn could ever fit", "system",
                      "context_length_exceeded") from None
    _publish_stats(services)
    return jsonify({"id": snap.id, "created": int(snap.created)}), 201


@bp.get("/<session_id>")
@documented(auth=KEYED)
def show(session_id: str):
    """The stored conversation (what the model will see next turn)."""
    try:
        snap = get_services().store.get(session_id, g.owner)
    except SessionNotFound:
        raise _not_found(session_id) from None
    return jsonify({"id": snap.id, "created": int(snap.created),
                    "last_active": int(snap.last_active), "turns": snap.turns,
                    "messages": [dict(m) for m in snap.messages], "tokens": snap.tokens,
                    "truncations": snap.truncations, "system": snap.system})


@bp.delete("/<session_id>")
@documented(status=204, auth=KEYED)
def delete(session_id: str):
    """Forget a conversation."""
    services = get_services()
    try:
        services.store.delete(session_id, g.owner)
    except SessionNotFound:
        raise _not_found(session_id) from None
    services.recent_turns.forget(session_id)
    _publish_stats(services)
    return "", 204


def _summary(session_id: str, result, stats) -> dict:
    snap = result.session
    return {"id": session_id, "turn": result.turn, "finish_reason": stats.finish_reason,
            "usage": {"prompt_tokens": stats.prompt_tokens,
                      "completion_tokens": stats.completion_tokens,
                      "total_tokens": stats.prompt_tokens + stats.completion_tokens},
            "history": {"messages": len(snap.messages), "tokens": snap.tokens,
                        "truncated": result.truncated}}


@bp.post("/<session_id>/messages")
@documented(table=params.SESSION_MESSAGE, required=("content",), auth=KEYED,
            produces=("application/json", "text/event-stream"))
def message(session_id: str):
    """Take one turn: the reply is committed to history only once it is complete."""
    body = validate.json_body()
    params.check(body, params.SESSION_MESSAGE, "sessions", get_services().config)
    content = validate.text(body, "content", required=True)
    sampling = turns.sampling_params(body, allow_stop=False)
    streaming = validate.boolean(body, "stream")

    started = time.perf_counter()
    services = get_services()
    tokenizer = services.engine.tokenizer
    store = services.store
    stack = ExitStack()
    try:
        turn = stack.enter_context(store.turn(session_id, g.owner, content,
                                              timeout=services.config.queue_timeout_s))
        turns.check_context(turn.prompt_tokens, sampling)
        gen = turns.start(turn.prompt, sampling)
    except SessionNotFound:
        stack.close()
        raise _not_found(session_id) from None
    except SessionBusy:
        stack.close()
        services.metrics.requests_rejected_total.labels(reason="session_busy").inc()
        raise ApiError(409, "another turn of this session is in progress", code="session_busy",
                       retry_after=1) from None
    except ContextTooLong as err:
        stack.close()
        services.recorder.on_reject("prompt_too_long")
        raise invalid(f"the message needs {_tokens(err)} tokens with the system prompt; the "
                      f"history budget is {err.limit}", "content", "context_length_exceeded") from None
    except BaseException:
        stack.close()
        raise

    def finish(g_) -> tuple:
        try:
            result = turn.commit(g_.text) if g_.stats.finish_reason != "cancelled" else None
        except SessionNotFound:  # deleted (or expired) while the turn ran: an expected race
            turns.observe(g_, services, turn=turn.index, history_messages=None)
            services.metrics.requests_rejected_total.labels(reason="session_gone").inc()
            raise ApiError(404, "the session was deleted or expired while this turn ran; the reply "
                                "was not stored", code="session_not_found", param="id") from None
        except StoreFailure as err:  # the disk filled or the store went away during the turn
            turns.observe(g_, services, turn=turn.index, history_messages=None)
            raise store_unavailable(err, services) from None
        turns.observe(g_, services, turn=turn.index,
                      history_messages=len(result.session.messages) if result else None)
        if result is not None:  # the page's latency sparkline: committed turns only
            services.recent_turns.record(session_id, result.turn, time.perf_counter() - started)
        _publish_stats(services)
        return result

    if not streaming:
        with stack:
            stack.callback(gen.close)
            text = turns.drain(gen)
            result = finish(gen)
        if result is None:
            raise ApiError(503, "the turn was cancelled (server shutting down?); nothing was "
                                "stored", code="cancelled", retry_after=1)
        out = _summary(session_id, result, gen.stats)
        out["message"] = {"role": "assistant", "content": text}
        if sampling.top_logprobs is not None:
            out["logprobs"] = logprobs.chat(tokenizer, gen.take_logprobs(final=True))
        return jsonify(out)

    def delta(piece: str) -> list[dict]:
        if sampling.top_logprobs is None:
            return [{"delta": piece}]
        return [{"delta": piece, "logprobs": logprobs.chat(tokenizer, gen.take_logprobs())}]

    def tail(g_) -> list[dict]:
        rest = g_.take_logprobs(final=True)
        events = [{"delta": "", "logprobs": logprobs.chat(tokenizer, rest)}] if rest else []
        return events + [_summary(session_id, finish(g_), g_.stats)]

    return turns.stream(gen, stack, turn=turn.index, head=[], delta=delta, tail=tail)
