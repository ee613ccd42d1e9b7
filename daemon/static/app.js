// edgechat's page: chat over the sessions API (streamed), and a side panel polling /v1/stats.
// Plain browser JavaScript, no build step, no library; talks only to the daemon that served it.
"use strict";

(() => {
  const SESSION_KEY = "edgechat.session";   // localStorage: a reload continues the conversation
  const SYSTEM_KEY = "edgechat.system";     // localStorage: the system prompt for new conversations
  const API_KEY = "edgechat.apiKey";        // sessionStorage: the key never outlives the tab
  const POLL_MS = 3000;
  const MAX_RETRIES = 3;

  const $ = (id) => document.getElementById(id);
  const ui = {
    log: $("log"), empty: $("empty"), scroller: $("scroller"), notice: $("notice"),
    trimNote: $("trim-note"), form: $("composer"), message: $("message"), send: $("send"),
    system: $("system"), apiKey: $("api-key"), settings: $("settings"), newChat: $("new-chat"),
  };
  const state = { session: localStorage.getItem(SESSION_KEY), busy: false, abort: null, poll: 0 };

  // ---- talking to the daemon -------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, error, retryAfter) {
      super((error && error.message) || `HTTP ${status}`);
      this.status = status;
      this.code = error && error.code;
      this.retryAfter = Number.parseInt(retryAfter, 10);
    }
  }

  function headers(withBody) {
    const h = {};
    if (withBody) h["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(API_KEY);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function api(method, path, body, signal) {
    let resp;
    try {
      resp = await fetch(path, { method, signal, headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, null, null);  // network down or daemon stopped
    }
    if (!resp.ok) {
      let error = null;
      try { error = (await resp.json()).error; } catch (_) { /* not our JSON: a proxy's page */ }
      throw new ApiError(resp.status, error, resp.headers.get("Retry-After"));
    }
    return resp;
  }

  function plainWords(err) {
    switch (err.status) {
      case 0: return err.message.startsWith("HTTP") ? "Cannot reach the daemon. Is it running?" : err.message;
      case 401: return "This daemon needs an API key, or the key is wrong: enter it under Settings.";
      case 404: return "This conversation is gone from the server (it expired or was evicted).";
      case 409: return "Another reply in this conversation is still being written.";
      case 413: return "That message is too long for this daemon.";
      case 503: return "The model is busy.";
      case 400: return err.code === "context_length_exceeded"
        ? "That message does not fit the model's context, even with older turns trimmed."
        : `The daemon refused the message: ${err.message}`;
      default: return `The daemon answered with an error: ${err.message}`;
    }
  }

  // Read an SSE body: {"delta"} events, one summary object, then [DONE]; in-band errors throw.
  async function readStream(resp, onDelta) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let summary = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const data = buf.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        buf = buf.slice(cut + 2);
        if (!data) continue;
        if (data === "[DONE]") { reader.cancel().catch(() => {}); return summary; }
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(500, event.error, null);
        if (typeof event.delta === "string") onDelta(event.delta);
        else if (event.turn !== undefined) summary = event;
      }
    }
    if (summary) return summary;
    throw new ApiError(0, { message: "The reply was cut off (connection closed early)." }, null);
  }

  // ---- the conversation ------------------------------------------------------------------
  function setSession(id) {
    state.session = id;
    if (id) localStorage.setItem(SESSION_KEY, id); else localStorage.removeItem(SESSION_KEY);
  }

  function addMessage(role, text) {
    const li = document.createElement("li");
    li.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    const node = document.createTextNode(text);
    body.append(node);
    const meta = document.createElement("div");
    meta.className = "meta";
    li.append(who, body, meta);
    ui.log.append(li);
    ui.empty.hidden = true;
    scrollDown(true);
    return { li, node, meta };
  }

  function scrollDown(force) {
    const s = ui.scroller;
    if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 80) s.scrollTop = s.scrollHeight;
  }

  function notice(text, kind = "info") {
    ui.notice.textContent = text;
    ui.notice.className = `notice ${kind}`;
    ui.notice.hidden = !text;
  }

  function sleepCounting(seconds, words, attempt, signal) {
    return new Promise((resolve, reject) => {
      let left = seconds;
      const tick = () => {
        if (signal.aborted) { reject(new DOMException("aborted", "AbortError")); return; }
        if (left <= 0) { resolve(); return; }
        notice(`${words} Retrying in ${left} s (attempt ${attempt} of ${MAX_RETRIES}).`, "warn");
        left -= 1;
        setTimeout(tick, 1000);
      };
      tick();
    });
  }

  async function ensureSession(signal) {
    if (state.session) return state.session;
    const system = ui.system.value.trim();
    const resp = await api("POST", "v1/sessions", system ? { system } : {}, signal);
    setSession((await resp.json()).id);
    return state.session;
  }

  // One turn: retried while the daemon says "busy" (503 / 409 with Retry-After) before any text came.
  async function takeTurn(text, reply, signal) {
    let restarted = false;
    for (let attempt = 1; ; attempt += 1) {
      try {
        const id = await ensureSession(signal);
        const resp = await api("POST", `v1/sessions/${encodeURIComponent(id)}/messages`,
          { content: text, stream: true }, signal);
        notice("");
        return await readStream(resp, (delta) => { reply.node.appendData(delta); scrollDown(false); });
      } catch (err) {
        if (err.status === 404 && !restarted) {  // the session expired: this message starts a new one
          restarted = true;
          setSession(null);
          notice("The previous conversation expired on the server; this message starts a new one.");
          attempt -= 1;
          continue;
        }
        if ((err.status === 503 || err.status === 409) && attempt <= MAX_RETRIES) {
          const wait = Math.min(Math.max(err.retryAfter || 2, 1), 30);
          await sleepCounting(wait, plainWords(err), attempt, signal);
          continue;
        }
        throw err;
      }
    }
  }

  async function send(text) {
    state.busy = true;
    ui.send.disabled = true;
    state.abort = new AbortController();
    const mine = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.li.classList.add("streaming");
    reply.li.setAttribute("aria-busy", "true");
    try {
      const summary = await takeTurn(text, reply, state.abort.signal);
      const h = summary.history;
      reply.meta.textContent = `turn ${summary.turn} · ${summary.usage.completion_tokens} tokens`
        + (summary.finish_reason === "length" ? " · stopped at the token limit" : "");
      if (h.truncated > 0) {
        reply.meta.textContent += ` · ${h.truncated} oldest messages trimmed`;
        dropTrimmed(h.messages);
      }
      setHistoryCount(h.messages, null);
    } catch (err) {
      mine.li.remove();
      reply.li.remove();
      if (ui.log.children.length === 0) ui.empty.hidden = false;
      if (err.name !== "AbortError") {
        if (!ui.message.value) ui.message.value = text;  // nothing was stored: give the text back
        notice(`Not sent: ${plainWords(err)}`, "error");
        if (err.status === 401) ui.settings.open = true;
      }
    } finally {
      reply.li.classList.remove("streaming");
      reply.li.removeAttribute("aria-busy");
      state.busy = false;
      state.abort = null;
      ui.send.disabled = false;
      pollNow();
    }
  }

  // Mirror the server's trimming: it keeps only the newest `kept` messages of the history.
  function dropTrimmed(kept) {
    const items = Array.from(ui.log.children);
    const extra = items.length - kept;
    for (let i = 0; i < extra; i += 1) items[i].classList.add("trimmed");
    ui.trimNote.textContent = "Greyed-out messages were trimmed from the model's memory: it no longer sees them.";
    ui.trimNote.hidden = false;
  }

  async function restore() {
    if (!state.session) return;
    try {
      const s = await (await api("GET", `v1/sessions/${encodeURIComponent(state.session)}`)).json();
      for (const m of s.messages) addMessage(m.role, m.content);
      if (s.system) ui.system.value = s.system;
      if (s.truncations > 0) {
        ui.trimNote.textContent = `${s.truncations} earlier messages were trimmed by the history limit; `
          + "this is what the model still sees.";
        ui.trimNote.hidden = false;
      }
    } catch (err) {
      if (err.status === 404) {
        setSession(null);
        notice("Your previous conversation expired on the server; a new one starts with your next message.");
      } else {
        notice(plainWords(err), "error");
        if (err.status === 401) ui.settings.open = true;
      }
    }
  }

  function newConversation() {
    if (state.abort) state.abort.abort();  // closing the stream stops the generation on the server
    const old = state.session;
    setSession(null);
    if (old) api("DELETE", `v1/sessions/${encodeURIComponent(old)}`).catch(() => {});  // free it now
    ui.log.replaceChildren();
    ui.empty.hidden = false;
    ui.trimNote.hidden = true;
    notice("");
    ui.message.focus();
    pollNow();
  }

  // ---- the side panel ----------------------------------------------------------------------
  const fmtBytes = (n) => (n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : `${Math.round(n / (1 << 20))} MiB`);
  const fmtSec = (s) => (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);
  const set = (id, text) => { $(id).textContent = text; };

  function setHistoryCount(messages, limit) {
    const el = $("history-count");
    const lim = limit === null ? el.dataset.limit || "?" : String(limit);
    el.dataset.limit = lim;
    el.textContent = `${messages} / ${lim}`;
  }

  function renderStats(st) {
    const m = st.memory;
    set("rss", fmtBytes(m.rss_bytes));
    set("pid", `pid ${st.pid}`);
    set("service", fmtBytes(m.service_bytes));
    set("limit", fmtBytes(m.limit_bytes));
    set("limit-source", `(${m.limit_source})`);
    const share = Math.min(m.service_bytes / m.limit_bytes, 1);
    set("service-share", `The service uses ${(share * 100).toFixed(share < 0.1 ? 1 : 0)} % of its memory limit.`);
    const bar = $("service-bar");
    bar.style.width = `${(share * 100).toFixed(1)}%`;
    bar.className = `fill${share > 0.9 ? " bad" : share > 0.75 ? " warn" : ""}`;

    set("model-chip", `${st.model} · ${st.dtype}`);
    set("model", st.model);
    set("dtype", st.dtype);
    set("queue", `${st.queue_depth} request${st.queue_depth === 1 ? "" : "s"}`);
    const leaking = st.leak_mode !== "off";
    const leak = $("leak-mode");
    leak.textContent = leaking ? `${st.leak_mode}: leaking on purpose` : "off";
    leak.classList.toggle("bad", leaking);
    const badge = $("leak-badge");
    badge.hidden = !leaking;
    badge.textContent = leaking ? `Leak mode: ${st.leak_mode}` : "";

    const h = st.history;
    set("store-line", `${h.sessions} session${h.sessions === 1 ? "" : "s"} held · `
      + `longest ${h.messages_max} messages, ${h.tokens_max} tokens`);
    renderSession(st.session, h.limit);
  }

  function renderSession(s, limit) {
    const count = $("history-count");
    const marker = $("trim-marker");
    if (!s) {
      setHistoryCount(0, limit);
      count.classList.remove("bad");
      marker.hidden = true;
      renderSpark([]);
      return;
    }
    setHistoryCount(s.messages, s.limit);
    count.classList.toggle("bad", s.over_limit);
    set("history-detail", s.over_limit
      ? "Over the limit: this history is not being trimmed."
      : `${s.turns} turn${s.turns === 1 ? "" : "s"} so far · ${s.tokens} tokens the model re-reads each turn`);
    marker.hidden = !s.trimmed;
    marker.textContent = s.trimmed ? `✂ ${s.truncations} oldest messages trimmed so far` : "";
    renderSpark(s.recent_turns);
  }

  function renderSpark(turns) {
    const W = 240, H = 56, PAD = 4;
    const svg = $("spark");
    svg.dataset.points = String(turns.length);
    const line = $("spark-line"), area = $("spark-area"), dot = $("spark-dot");
    if (!turns.length) {
      line.setAttribute("points", "");
      area.setAttribute("d", "");
      dot.setAttribute("cx", "-10");
      set("spark-title", "No turns measured yet");
      set("latency-line", "Each turn's time from request to last token, for the last 20 turns.");
      return;
    }
    const secs = turns.map((t) => t.seconds);
    const max = Math.max(...secs) || 1;
    const step = turns.length > 1 ? (W - 2 * PAD) / (turns.length - 1) : 0;
    const pts = secs.map((s, i) => [turns.length > 1 ? PAD + i * step : W / 2,
      H - PAD - (s / max) * (H - 2 * PAD)]);
    const text = pts.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`);
    line.setAttribute("points", text.join(" "));
    area.setAttribute("d", `M${pts[0][0].toFixed(1)},${H - PAD} L${text.join(" L")} `
      + `L${pts[pts.length - 1][0].toFixed(1)},${H - PAD} Z`);
    const [lx, ly] = pts[pts.length - 1];
    dot.setAttribute("cx", lx.toFixed(1));
    dot.setAttribute("cy", ly.toFixed(1));
    const last = turns[turns.length - 1];
    const summary = `Last turn (${last.turn}) ${fmtSec(last.seconds)} · slowest ${fmtSec(max)} `
      + `over turns ${turns[0].turn}–${last.turn}`;
    set("spark-title", `Latency of the last ${turns.length} turns. ${summary}`);
    set("latency-line", summary);
  }

  async function poll() {
    clearTimeout(state.poll);
    if (!document.hidden) {
      const q = state.session ? `?session=${encodeURIComponent(state.session)}` : "";
      try {
        renderStats(await (await api("GET", `v1/stats${q}`)).json());
        set("stats-status", `updated ${new Date().toLocaleTimeString()}`);
      } catch (err) {
        set("stats-status", `no reading: ${plainWords(err)}`);
      }
    }
    state.poll = setTimeout(poll, POLL_MS);
  }
  const pollNow = () => { poll(); };

  // ---- wiring ------------------------------------------------------------------------------
  ui.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = ui.message.value.trim();
    if (!text || state.busy) return;
    ui.message.value = "";
    send(text);
  });
  ui.message.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.newChat.addEventListener("click", newConversation);
  ui.apiKey.value = sessionStorage.getItem(API_KEY) || "";
  const applyKey = () => {
    const key = ui.apiKey.value.trim();
    if (key) sessionStorage.setItem(API_KEY, key); else sessionStorage.removeItem(API_KEY);
    pollNow();
  };
  ui.apiKey.addEventListener("change", applyKey);
  $("settings-form").addEventListener("submit", (ev) => { ev.preventDefault(); applyKey(); });
  ui.system.value = localStorage.getItem(SYSTEM_KEY) || "";
  ui.system.addEventListener("change", () => localStorage.setItem(SYSTEM_KEY, ui.system.value));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) pollNow(); });

  restore().finally(pollNow);
})();
