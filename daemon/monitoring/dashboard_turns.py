"""The turns dashboard: latency by position in the conversation (creep), generation speed, queue and HTTP."""

from daemon.monitoring.dashboard_memory import T, firing_alerts_table, shared_annotations
from daemon.monitoring.grafana import dashboard, heatmap, quantile, rate, row, sel, stat, target, timeseries

UID = "edgechat-turns"
TITLE = "edgechat / Turns and latency"

_TURN = "edgechat_turn_duration_seconds"
_REQUESTS = "edgechat_http_requests_total"
_LATE, _FIRST = 'turn_index=~"11-20|21+"', 'turn_index="1"'
_5XX, _ERRORS = 'status=~"5.."', 'status=~"[45].."'
# error ratio that reads 0 (not "no data") while no 5xx has been counted yet
_ERROR_RATIO = (f"(sum by (instance) ({rate(_REQUESTS, _5XX)})"
                f" or 0 * sum by (instance) ({rate(_REQUESTS)}))"
                f" / sum by (instance) ({rate(_REQUESTS)})")


def _top_row():
    """Return the at-a-glance stats: load, errors, latency creep, work in flight."""
    return [
        stat("Turns per second", "Completed chat turns per second (all outcomes).", "ops",
             [target(f"sum by (instance) ({rate('edgechat_turns_total')})", "{{instance}}")],
             [(None, "blue")]),
        stat("HTTP 5xx ratio", "Share of HTTP requests answered with a 5xx status. Orange from "
             f"{T.error_ratio / 5:.0%}, red from {T.error_ratio:.0%} (EdgechatHighErrorRate).", "percentunit",
             [target(_ERROR_RATIO, "{{instance}}")],
             [(None, "green"), (T.error_ratio / 5, "orange"), (T.error_ratio, "red")]),
        stat("Latency creep (p95 turn 11+ / turn 1)",
             "p95 latency of turns 11 and later divided by p95 of first turns. About 1 when history is "
             "bounded; the unbounded-history bug drove it to ~6 (8.2 s vs 1.4 s) "
             f"(EdgechatTurnLatencyCreep from {T.creep_ratio:g}). Empty until conversations reach turn 11.",
             "none", [target(f"{quantile(0.95, _TURN, extra=_LATE)} / {quantile(0.95, _TURN, extra=_FIRST)}",
                             "{{instance}}")],
             [(None, "green"), (T.creep_ratio, "orange"), (2 * T.creep_ratio, "red")], decimals=1),
        stat("Generations in progress", "Generations in the batch now (each worker decodes up to max_batch "
             "together, one token each per step).",
             "short", [target(f"sum by (instance) ({sel('edgechat_generations_in_progress')})", "{{instance}}")],
             [(None, "blue")]),
        stat("Queue depth", "Requests waiting to join the batch. Sustained above zero means the device is "
             "saturated and new requests will soon be rejected.", "short",
             [target(f"sum by (instance) ({sel('edgechat_queue_depth')})", "{{instance}}")],
             [(None, "green"), (1, "orange"), (4, "red")]),
        stat("Model load time", "Seconds the worker took to load the model at start-up.", "s",
             [target(f"max by (instance) ({sel('edgechat_model_load_seconds')})", "{{instance}}")],
             [(None, "blue")]),
    ]


def _latency_rows():
    """Return turn latency p50/p95/p99 split by turn_index bucket."""
    panels = [row("Turn latency by position in the conversation")]
    for q, label in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        panels.append(timeseries(
            f"Turn latency {label} by turn index",
            f"{label} of whole-turn latency, one line per position in the conversation (1, 2-5, 6-10, 11-20, "
            "21+). Healthy: the lines lie together. History leak: later turns sit ever higher because each "
            "re-feeds the whole history (latency creep).", "s",
            [target(quantile(q, _TURN, by=("turn_index",)), "turn {{turn_index}}")], w=8, minimum=0))
    return panels


def _generation_rows():
    """Return time to first token, time per output token and token throughput."""
    tpot = "edgechat_time_per_output_token_seconds"
    return [
        row("Generation"),
        timeseries("Time to first token",
                   "p50 and p95 from request to the first generated token: queueing plus prefill of the "
                   "whole prompt. Grows with prompt length, so with untrimmed history.", "s",
                   [target(quantile(0.5, "edgechat_time_to_first_token_seconds"), "p50 {{instance}}"),
                    target(quantile(0.95, "edgechat_time_to_first_token_seconds"), "p95 {{instance}}")],
                   w=8, minimum=0),
        timeseries("Time per output token",
                   "p50 and p95 decode time per generated token. Mostly memory bandwidth bound; a rise "
                   "with constant prompts hints at swapping or a growing KV cache kept between turns.", "s",
                   [target(quantile(0.5, tpot), "p50 {{instance}}"), target(quantile(0.95, tpot), "p95 {{instance}}")],
                   w=8, minimum=0),
        timeseries("Tokens per second",
                   "Prompt and generated tokens processed per second across all turns, and the decode speed "
                   "of one generation (1 / mean time per output token), all in tokens/s.", "short",
                   [target(f"sum by (instance) ({rate('edgechat_completion_tokens_total')})", "generated {{instance}}"),
                    target(f"sum by (instance) ({rate('edgechat_prompt_tokens_total')})", "prompt {{instance}}"),
                    target(f"sum by (instance) ({rate(tpot + '_count')}) / sum by (instance) ({rate(tpot + '_sum')})",
                           "decode speed {{instance}}")], w=8, minimum=0),
    ]


def _kv_rows():
    """Return the KV-cache reuse panels: hit ratio, prompt tokens reused vs prefilled, bytes vs budget."""
    hits, misses = rate("edgechat_kv_cache_hits_total"), rate("edgechat_kv_cache_misses_total")
    reused = f"sum by (instance) ({rate('edgechat_kv_cache_reused_tokens_total')})"
    return [
        row("KV cache reuse across turns"),
        timeseries("KV cache hit ratio",
                   "Share of turns whose prompt reused a KV cache kept from an earlier turn (only its new "
                   "tokens were prefilled). With block trimming about 3 turns in 4 hit in a long session; "
                   "lower with several workers (a turn may land on the worker without the cache), a budget "
                   "too small for the live sessions, or history_trim_to = 1.", "percentunit",
                   [target(f"sum by (instance) ({hits}) / (sum by (instance) ({hits}) + sum by (instance) "
                           f"({misses}))", "{{instance}}")], w=8, minimum=0),
        timeseries("Prompt tokens reused and prefilled",
                   "Prompt tokens per second taken from kept KV caches, and those prefilled (run through "
                   "the model). Prefill is what makes turn latency grow with the conversation.", "short",
                   [target(reused, "reused {{instance}}"),
                    target(f"sum by (instance) ({rate('edgechat_prompt_tokens_total')}) - {reused}",
                           "prefilled {{instance}}")], w=8, minimum=0),
        timeseries("KV cache bytes and budget",
                   "Bytes of KV caches each worker holds, idle ones kept between turns and those the running "
                   "generations reserved, against the per-worker budget (kv_cache_bytes) they share (one "
                   "generation alone may exceed it). A tensor leak grows RSS while these stay flat.", "bytes",
                   [target(f"sum by (instance, pid) ({sel('edgechat_kv_cache_bytes')})", "held {{instance}} {{pid}}"),
                    target(f"sum by (instance, pid) ({sel('edgechat_kv_running_bytes')})",
                           "running {{instance}} {{pid}}"),
                    target(f"max by (instance) ({sel('edgechat_kv_cache_budget_bytes')})", "budget {{instance}}")],
                   w=8, minimum=0),
        timeseries("KV caches dropped by reason",
                   "KV caches dropped per second: lru (to fit the budget), oversize (larger than the whole "
                   "budget), released (Engine.release_caches: memory watchdog, shutdown), pressure (above "
                   "the soft memory limit). Sustained pressure drops: the service lives near its limit.",
                   "ops", [target(f"sum by (instance, reason) ({rate('edgechat_kv_cache_dropped_total')})",
                                  "{{reason}} {{instance}}")], w=24, minimum=0),
    ]


def _batch_rows():
    """Return the batch panels: generations per step against the limit, rows per step, why arrivals waited."""
    decode = "edgechat_batch_decode_rows"
    return [
        row("Batch"),
        timeseries("Generations per step",
                   "Generations decoding together in a step (each reads the weights once for all of them), "
                   "mean over the interval, against max_batch. At the limit with a queue: the device serves "
                   "all it can; more users need more devices.", "short",
                   [target(f"sum by (instance) ({rate(decode + '_sum')}) / sum by (instance) "
                           f"({rate(decode + '_count')})", "mean {{instance}}"),
                    target(f"max by (instance) ({sel('edgechat_batch_limit')})", "max_batch {{instance}}")],
                   w=8, minimum=0),
        timeseries("Rows and steps",
                   "Batch steps per second, and rows per step: decode tokens plus prompt tokens prefilled "
                   "beside them (up to prefill_chunk while others decode).", "short",
                   [target(f"sum by (instance) ({rate('edgechat_batch_rows_count')})", "steps/s {{instance}}"),
                    target(f"sum by (instance) ({rate('edgechat_batch_rows_sum')}) / sum by (instance) "
                           f"({rate('edgechat_batch_rows_count')})", "rows/step {{instance}}")], w=8, minimum=0),
        timeseries("Waits to join the batch",
                   "Requests per second that had to wait before joining the batch: batch_full (every place "
                   "taken) or kv_budget (their KV cache did not fit kv_cache_bytes beside the running ones). "
                   "Waits are not refusals; a wait past queue_timeout_s is (Rejected requests below).", "reqps",
                   [target(f"sum by (instance, reason) ({rate('edgechat_admission_waits_total')})",
                           "{{reason}} {{instance}}")], w=8, minimum=0),
    ]


def _queue_rows():
    """Return the queue panels: depth, wait and rejections."""
    return [
        row("Queue"),
        timeseries("Queue depth and generations in progress",
                   "Requests waiting to join the batch and generations in it. A queue that never drains means "
                   "turns take longer than users arrive (often latency creep).", "short",
                   [target(f"sum by (instance) ({sel('edgechat_queue_depth')})", "queued {{instance}}"),
                    target(f"sum by (instance) ({sel('edgechat_generations_in_progress')})",
                           "generating {{instance}}")], w=8, minimum=0),
        timeseries("Queue wait",
                   "p50 and p95 time a request waited for a place in the batch before its turn started.", "s",
                   [target(quantile(0.5, "edgechat_queue_wait_seconds"), "p50 {{instance}}"),
                    target(quantile(0.95, "edgechat_queue_wait_seconds"), "p95 {{instance}}")], w=8, minimum=0),
        timeseries("Rejected requests by reason",
                   "Requests turned away (queue full, memory watchdog, ...) per second. Empty while nothing "
                   "is rejected (EdgechatSaturated).", "reqps",
                   [target(f"sum by (instance, reason) ({rate('edgechat_requests_rejected_total')})", "{{reason}}")],
                   w=8, minimum=0),
    ]


def _http_rows():
    """Return request rate, errors by status, HTTP latency and turn outcomes."""
    return [
        row("HTTP"),
        timeseries("Requests by route and status",
                   "HTTP requests per second by route template and status code.", "reqps",
                   [target(f"sum by (instance, route, status) ({rate(_REQUESTS)})", "{{route}} {{status}}")],
                   w=8, minimum=0),
        timeseries("HTTP errors by status",
                   "4xx and 5xx responses per second by route, method and status. Empty while every request "
                   "succeeds.", "reqps",
                   [target(f"sum by (instance, route, method, status) ({rate(_REQUESTS, _ERRORS)})",
                           "{{method}} {{route}} {{status}}")], w=8, minimum=0),
        timeseries("HTTP request latency p95 by route",
                   "p95 of the time to answer each route (for streamed chat: until the stream ends).", "s",
                   [target(quantile(0.95, "edgechat_http_request_duration_seconds", by=("route",)), "{{route}}")],
                   w=8, minimum=0),
        timeseries("Turns by outcome", "Turns per second by outcome (completed, failed, cancelled, ...).", "ops",
                   [target(f"sum by (instance, outcome) ({rate('edgechat_turns_total')})", "{{outcome}}")],
                   minimum=0),
        firing_alerts_table(w=12, h=8),
    ]


def _prompt_rows():
    """Return the prompt-size distribution and the build identity."""
    return [
        row("Prompts and build"),
        heatmap("Prompt tokens per turn",
                "Distribution of prompt length (tokens, history included) of the turns in each interval. "
                "Bounded history: a band that stops rising. Unbounded history: the band climbs turn by turn.",
                "short", [target(f"sum by (le) ({rate('edgechat_turn_prompt_tokens_bucket', fn='increase')})",
                                 "{{le}}", fmt="heatmap")], w=16),
        stat("Build", "Versions of edgechat, Python, torch and transformers this daemon runs.", "none",
             [target(f"max by (instance, version, python, torch, transformers) ({sel('edgechat_build_info')})",
                     "edgechat {{version}} python {{python}} torch {{torch}} transformers {{transformers}}")],
             [(None, "blue")], w=8, h=9, text_mode="name"),
    ]


def build():
    """Return the turns dashboard as a dict."""
    panels = [*_top_row(), *_latency_rows(), *_generation_rows(), *_kv_rows(), *_batch_rows(), *_queue_rows(),
              *_http_rows(), *_prompt_rows()]
    return dashboard(UID, TITLE,
                     "How edgechat's turns behave: latency by position in the conversation (creep), time to "
                     "first token, tokens/s, queue and HTTP. See docs/dashboards.md.",
                     panels, shared_annotations(), [("edgechat-memory", "edgechat / Is it leaking?")])
