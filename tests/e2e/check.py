#!/usr/bin/env python3
"""End-to-end checks of llmproxy in front of a real llama.cpp server (see real_backend.sh).

Only the standard library. The model is a base model, so nothing here looks at generated text:
only structure (which chunks, which keys) and counts (tokens, events, requests).

Every request through the proxy carries its own x-request-id; the usage events the webhook
receiver recorded are matched to requests by `request_id`. Every check prints one PASS/FAIL
line with its numbers; the last line is "N passed, N failed". Exit status 1 on any failure.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import uuid

CHAT_PROMPT = "Write a short poem about the sea."
COMPLETION_PROMPT = "The capital of France is"
API_KEY = "sk-e2e-raw-key-must-never-appear"
SMALL = 8  # max_tokens for ordinary requests (~0.4 s of generation each)
ABORT_MAX_TOKENS = 400  # ~16 s if the server generated all of it

RESULTS = []  # (ok, name, detail)
NOTES = []  # observations that are not pass/fail (deviations the lead should know about)
REQUESTS = []  # dicts: name, request_id, want (usage dict or None), outcome, stream
PROXY_LOG = None  # path of the proxy's log (debug level): counts stale-connection re-sends
SERVER_PROMPT = {}  # prompt tokens llama.cpp reports for our chat prompt, asked directly


def check(ok, name, detail=""):
    RESULTS.append((bool(ok), name, detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return bool(ok)


def note(msg):
    NOTES.append(msg)
    print(f"[NOTE] {msg}", flush=True)


def stale_resends():
    """How often the proxy found a pooled upstream connection closed and re-sent the request
    on a fresh one (a debug line in its log)."""
    if not PROXY_LOG:
        return None
    try:
        with open(PROXY_LOG, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if "was stale" in line)
    except FileNotFoundError:
        return None


def step(msg):
    print(f"--- {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# HTTP helpers


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body
        self.elapsed = elapsed

    def json(self):
        return json.loads(self.body)


def request(base, method, path, body=None, headers=None, conn=None, timeout=60):
    """One request; `conn` (an http.client.HTTPConnection) lets callers reuse a connection."""
    host, port = base
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    h = {"content-type": "application/json"} if body is not None else {}
    h.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        return Resp(r.status, hdrs, raw, time.monotonic() - t0)
    finally:
        if own:
            conn.close()


def new_id(name):
    return f"e2e-{name}-{uuid.uuid4().hex[:12]}"


def proxied(px, name, path, body, want_outcome="ok", headers=None, conn=None):
    """A request through the proxy, registered for the usage-event checks."""
    rid = new_id(name)
    h = {"x-request-id": rid}
    h.update(headers or {})
    r = request(px, "POST", path, body, h, conn=conn)
    entry = {
        "name": name,
        "request_id": rid,
        "want": None,
        "outcome": want_outcome,
        "stream": bool(body.get("stream")),
        "resp": r,
    }
    REQUESTS.append(entry)
    check(
        r.headers.get("x-request-id") == rid,
        f"{name}: x-request-id echoed",
        f"status {r.status}, {len(r.body)} body bytes in {r.elapsed:.2f}s",
    )
    return entry


def sse_events(body):
    """Splits an SSE body (already de-chunked) into the payloads of its `data:` lines."""
    text = body.decode("utf-8")
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        data = [l[5:].lstrip(" ") for l in block.split("\n") if l.startswith("data:")]
        events.append("\n".join(data))
    return events


def parse_stream(body):
    """[(payload_str, obj_or_None)], obj None only for [DONE]."""
    out = []
    for p in sse_events(body):
        out.append((p, None if p == "[DONE]" else json.loads(p)))
    return out


def shape(obj, ignore=()):
    """The structure of one stream event without its values (text, ids, timings)."""
    if obj is None:
        return "DONE"
    keys = tuple(sorted(k for k in obj if k not in ignore and obj[k] is not None))
    choices = []
    for c in obj.get("choices") or []:
        ck = tuple(sorted(k for k in c))
        dk = tuple(sorted((c.get("delta") or {}).keys())) if "delta" in c else None
        choices.append((ck, dk, c.get("finish_reason") is not None))
    return (keys, len(obj.get("choices") or []), tuple(choices))


def stream_shape(events, ignore=()):
    """Shapes with runs of identical shapes (token chunks) collapsed."""
    out = []
    for _, obj in events:
        s = shape(obj, ignore)
        if not out or out[-1] != s:
            out.append(s)
    return out


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
              "upgrade", "proxy-connection"}


def missing_headers(direct, proxied_resp):
    """End-to-end response headers of a direct response that the proxied one lacks or changed."""
    out = []
    for k, v in direct.headers.items():
        if k in HOP_BY_HOP:
            continue
        if proxied_resp.headers.get(k) != v:
            out.append(f"{k}: {v!r} -> {proxied_resp.headers.get(k)!r}")
    return out


def usage_only(obj):
    return obj is not None and obj.get("choices") == [] and obj.get("usage") is not None


def usage_of(obj):
    u = obj.get("usage") or {}
    return {
        "prompt_tokens": u.get("prompt_tokens"),
        "completion_tokens": u.get("completion_tokens"),
        "total_tokens": u.get("total_tokens"),
        "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
    }


def metrics(base):
    r = request(base, "GET", "/metrics", timeout=10)
    out = {}
    for line in r.body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def metric_sum(m, prefix):
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


# --------------------------------------------------------------------------------------------
# Checks


def chat_body(max_tokens, stream=False, **extra):
    b = {
        "model": "gemma3",
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": max_tokens,
    }
    if stream:
        b["stream"] = True
    b.update(extra)
    return b


def completion_body(max_tokens, stream=False, **extra):
    b = {"model": "gemma3", "prompt": COMPLETION_PROMPT, "max_tokens": max_tokens}
    if stream:
        b["stream"] = True
    b.update(extra)
    return b


def check_nonstream(px, ll, name, path, body, reply_key):
    direct = request(ll, "POST", path, body)
    dj = direct.json()
    e = proxied(px, name, path, body)
    r = e["resp"]
    ok = check(r.status == 200, f"{name}: status 200", f"got {r.status}")
    if not ok:
        return
    j = r.json()
    e["want"] = usage_of(j)
    check(
        set(j) == set(dj),
        f"{name}: same top-level fields as a direct request",
        f"proxy {sorted(j)} / direct {sorted(dj)}",
    )
    miss = missing_headers(direct, r)
    check(not miss, f"{name}: llama.cpp's response headers passed through",
          f"{sorted(k for k in direct.headers if k not in HOP_BY_HOP)}" + (f"; changed {miss}" if miss else ""))
    t = j.get("timings") or {}
    check(
        isinstance(t, dict) and t.get("predicted_n") == j["usage"]["completion_tokens"],
        f"{name}: llama.cpp's non-standard `timings` passed through",
        f"timings.predicted_n={t.get('predicted_n')} prompt_n={t.get('prompt_n')} cache_n={t.get('cache_n')}",
    )
    c = j["choices"][0]
    fr = c.get("finish_reason")
    check(
        reply_key in c and fr in ("length", "stop"),
        f"{name}: choice structure",
        f"choices={len(j['choices'])} has {reply_key!r}, finish_reason={fr}",
    )
    u = j["usage"]
    check(
        (fr != "length" or u["completion_tokens"] == body["max_tokens"])
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"],
        f"{name}: usage in the body",
        f"prompt={u['prompt_tokens']} completion={u['completion_tokens']} "
        f"total={u['total_tokens']} (max_tokens {body['max_tokens']}); "
        f"direct request: prompt={dj['usage']['prompt_tokens']}",
    )
    check(
        u["prompt_tokens"] == dj["usage"]["prompt_tokens"],
        f"{name}: prompt tokens equal a direct request's",
        f"{u['prompt_tokens']} == {dj['usage']['prompt_tokens']}",
    )


def check_streams(px, ll):
    # What llama.cpp itself says for this prompt, asked directly.
    step("direct streams to llama.cpp (reference shapes and the prompt's token count)")
    d_usage = request(ll, "POST", "/v1/chat/completions",
                      chat_body(SMALL, True, stream_options={"include_usage": True}))
    d_usage_ev = parse_stream(d_usage.body)
    d_usage_chunks = [o for _, o in d_usage_ev if usage_only(o)]
    check(
        len(d_usage_chunks) == 1,
        "direct chat stream with include_usage: llama.cpp sends one usage-only chunk",
        f"{len(d_usage_chunks)} usage-only chunk(s) in {len(d_usage_ev)} events",
    )
    ref = usage_of(d_usage_chunks[-1]) if d_usage_chunks else {}
    server_prompt = ref.get("prompt_tokens")
    SERVER_PROMPT["chat"] = server_prompt
    print(f"       llama.cpp counts {server_prompt} prompt tokens for the chat prompt", flush=True)
    d_plain = request(ll, "POST", "/v1/chat/completions", chat_body(SMALL, True))
    d_plain_ev = parse_stream(d_plain.body)

    # 1. The client streams without stream_options: the proxy injects include_usage and strips
    #    the usage-only chunk.
    step("streamed chat without stream_options through the proxy")
    e = proxied(px, "chat-stream-plain", "/v1/chat/completions", chat_body(SMALL, True))
    r = e["resp"]
    if check(r.status == 200, "chat-stream-plain: status 200",
             f"{r.status}, content-type {r.headers.get('content-type')}"):
        ev = parse_stream(r.body)
        n_usage_only = sum(1 for _, o in ev if usage_only(o))
        n_usage_any = sum(1 for _, o in ev if o is not None and o.get("usage") is not None)
        n_content = sum(
            1 for _, o in ev
            if o is not None and o.get("choices") and (o["choices"][0].get("delta") or {}).get("content")
        )
        check(
            n_usage_only == 0 and n_usage_any == 0,
            "chat-stream-plain: no usage chunk reaches the client",
            f"{len(ev)} events, {n_usage_only} usage-only, {n_usage_any} carrying usage, "
            f"{n_content} content chunks",
        )
        check(
            ev and ev[-1][0] == "[DONE]" and r.body.endswith(b"data: [DONE]\n\n"),
            "chat-stream-plain: ends with data: [DONE]",
            f"last event {ev[-1][0][:40] if ev else None!r}",
        )
        finish = [o for _, o in ev if o and o.get("choices") and o["choices"][0].get("finish_reason")]
        check(
            len(finish) == 1,
            "chat-stream-plain: one finish chunk",
            f"finish_reason={finish[0]['choices'][0]['finish_reason'] if finish else None}",
        )
        # Same structure as llama.cpp's own stream without include_usage, `timings` included:
        # with include_usage llama.cpp moves `timings` from the finish chunk to the usage-only
        # chunk, and the proxy puts it back on the finish chunk when it removes that chunk.
        miss = missing_headers(d_plain, r)
        check(not miss, "chat-stream-plain: llama.cpp's response headers passed through",
              f"{sorted(k for k in d_plain.headers if k not in HOP_BY_HOP)}"
              + (f"; changed {miss}" if miss else ""))
        ps, ds = stream_shape(ev, ()), stream_shape(d_plain_ev, ())
        check(
            ps == ds,
            "chat-stream-plain: event structure equals llama.cpp's own stream without include_usage "
            "(timings included)",
            f"{len(ps)} distinct shapes" if ps == ds else f"proxy {ps} / direct {ds}",
        )
        d_timings = sum(1 for _, o in d_plain_ev if o and "timings" in o)
        p_timings = sum(1 for _, o in ev if o and "timings" in o)
        check(
            p_timings == d_timings,
            "chat-stream-plain: llama.cpp's `timings` on the same events as without the proxy",
            f"direct {d_timings} event(s), through the proxy {p_timings}",
        )
        e["want"] = stream_want(ev, SMALL)

    # 2. The client asked for usage itself: it gets the usage chunk unchanged.
    step("streamed chat with stream_options.include_usage through the proxy")
    e = proxied(px, "chat-stream-usage", "/v1/chat/completions",
                chat_body(SMALL, True, stream_options={"include_usage": True}))
    r = e["resp"]
    if check(r.status == 200, "chat-stream-usage: status 200", f"{r.status}"):
        ev = parse_stream(r.body)
        chunks = [o for _, o in ev if usage_only(o)]
        ok = check(
            len(chunks) == 1 and ev[-1][0] == "[DONE]" and usage_only(ev[-2][1]),
            "chat-stream-usage: the usage-only chunk reaches the client, just before [DONE]",
            f"{len(chunks)} usage-only chunk(s) in {len(ev)} events",
        )
        if ok:
            u = usage_of(chunks[0])
            finish = [o["choices"][0].get("finish_reason") for _, o in ev
                      if o and o.get("choices") and o["choices"][0].get("finish_reason")]
            want_completion = SMALL if finish == ["length"] else u["completion_tokens"]
            check(
                u["completion_tokens"] == want_completion and u["prompt_tokens"] == server_prompt
                and "timings" in chunks[0] and set(chunks[0]) == set(d_usage_chunks[0]),
                "chat-stream-usage: usage chunk unchanged (fields and counts as llama.cpp sends them)",
                f"usage {chunks[0]['usage']}, fields {sorted(chunks[0])}",
            )
            e["want"] = u
        ps, ds = stream_shape(ev), stream_shape(d_usage_ev)
        check(ps == ds, "chat-stream-usage: event structure equals llama.cpp's own (timings included)",
              f"{len(ps)} distinct shapes" if ps == ds else f"proxy {ps} / direct {ds}")

    # 3. Streamed completions: llama.cpp always puts usage on the finish chunk (choices not
    #    empty), which must never be removed.
    step("streamed completions through the proxy")
    d = request(ll, "POST", "/v1/completions", completion_body(SMALL, True))
    dev = parse_stream(d.body)
    e = proxied(px, "completion-stream", "/v1/completions", completion_body(SMALL, True))
    r = e["resp"]
    if check(r.status == 200, "completion-stream: status 200", f"{r.status}"):
        ev = parse_stream(r.body)
        ps, ds = stream_shape(ev), stream_shape(dev)
        check(ps == ds, "completion-stream: event structure equals llama.cpp's own",
              f"{len(ev)} events, {len(ps)} distinct shapes" if ps == ds else f"proxy {ps} / direct {ds}")
        with_usage = [o for _, o in ev if o and o.get("usage")]
        if check(
            len(with_usage) == 1 and with_usage[0]["choices"] and ev[-1][0] == "[DONE]",
            "completion-stream: the finish chunk keeps its usage; ends with [DONE]",
            f"usage {with_usage[0]['usage'] if with_usage else None}",
        ):
            e["want"] = usage_of(with_usage[0])
    return server_prompt


def stream_want(ev, max_tokens):
    """What the usage event of a chat stream without usage must say: the prompt tokens llama.cpp
    reports for this prompt when asked directly, and max_tokens when it stopped on length."""
    finish = [o["choices"][0].get("finish_reason") for _, o in ev
              if o and o.get("choices") and o["choices"][0].get("finish_reason")]
    prompt = SERVER_PROMPT.get("chat")
    if finish == ["length"]:
        return {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                "total_tokens": (prompt or 0) + max_tokens}
    note(f"a chat stream ended with finish_reason {finish}: only prompt tokens compared")
    return {"prompt_tokens": prompt}


def check_concurrent(px, ll):
    """Four requests at once (llama.cpp runs 4 slots): events still match request by request."""
    step("4 concurrent requests (streamed and not) through the proxy")
    bodies = [
        ("conc-0", "/v1/chat/completions", chat_body(12, True)),
        ("conc-1", "/v1/chat/completions", chat_body(12, True, stream_options={"include_usage": True})),
        ("conc-2", "/v1/completions", completion_body(12)),
        ("conc-3", "/v1/chat/completions", chat_body(12)),
    ]
    results = {}

    def run(name, path, body):
        rid = new_id(name)
        try:
            r = request(px, "POST", path, body, {"x-request-id": rid, "x-user-id": f"user-{name}",
                                                 "authorization": f"Bearer {API_KEY}-{name}"})
        except Exception as ex:  # recorded as a failure below
            r = ex
        results[name] = (rid, r, body)

    threads = [threading.Thread(target=run, args=b) for b in bodies]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    ok_all = True
    for name, path, body in bodies:
        rid, r, body = results.get(name, (None, None, body))
        if not isinstance(r, Resp) or r.status != 200:
            ok_all = False
            check(False, f"{name}: status 200", repr(r))
            continue
        entry = {"name": name, "request_id": rid, "outcome": "ok", "stream": bool(body.get("stream")),
                 "resp": r, "user_id": f"user-{name}", "want": None,
                 "key_id": "key-" + hashlib.sha256(f"{API_KEY}-{name}".encode()).hexdigest()[:16]}
        if body.get("stream"):
            ev = parse_stream(r.body)
            ch = [o for _, o in ev if usage_only(o)]
            if body.get("stream_options"):
                entry["want"] = usage_of(ch[0]) if ch else None
                ok_all &= len(ch) == 1
            else:
                entry["want"] = stream_want(ev, 12)
                ok_all &= len(ch) == 0
            ok_all &= ev[-1][0] == "[DONE]"
        else:
            entry["want"] = usage_of(r.json())
        REQUESTS.append(entry)
    check(ok_all, "concurrent: 4 requests completed with the right structure", f"in {took:.2f}s")


def check_context_exceeded(px, ll):
    """A prompt longer than a slot's context: llama.cpp answers 400 before any SSE byte."""
    step("streamed chat whose prompt exceeds the context (llama.cpp: 400 before the stream)")
    body = chat_body(4, True)
    body["messages"][0]["content"] = "hello " * 3000
    d = request(ll, "POST", "/v1/chat/completions", body)
    e = proxied(px, "too-long", "/v1/chat/completions", body)
    r = e["resp"]
    e["status"] = r.status
    e["outcome"] = None  # reported, not asserted: a backend's 4xx is none of the failure outcomes
    try:
        err = r.json().get("error", {})
    except ValueError:
        err = {}
    check(
        r.status == d.status == 400 and err.get("type") == "exceed_context_size_error"
        and r.body == d.body,
        "too-long: llama.cpp's 400 reaches the client unchanged",
        f"direct {d.status}, proxied {r.status}, error type {err.get('type')!r}, "
        f"prompt {err.get('n_prompt_tokens')} > context {err.get('n_ctx')}",
    )


def check_abort(px, ll):
    step(f"client disconnect mid-stream (max_tokens {ABORT_MAX_TOKENS})")
    m0 = metrics(ll)
    before = m0.get("llamacpp:tokens_predicted_total", 0)
    rid = new_id("abort")
    body = json.dumps(chat_body(ABORT_MAX_TOKENS, True)).encode()
    s = socket.create_connection(px, timeout=30)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: e2e\r\ncontent-type: application/json\r\n"
        + f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    t0 = time.monotonic()
    while got.count(b"data: ") < 6 and time.monotonic() - t0 < 30:
        part = s.recv(65536)
        if not part:
            break
        got += part
    n_read = got.count(b"data: ")
    during = metrics(ll)
    s.close()
    t_close = time.monotonic()
    REQUESTS.append({"name": "abort", "request_id": rid, "want": None, "outcome": "client_aborted",
                     "stream": True, "resp": None})
    check(n_read >= 6, "abort: stream started before the disconnect",
          f"read {n_read} events in {t_close - t0:.2f}s; llama.cpp requests_processing="
          f"{during.get('llamacpp:requests_processing')}")
    # llama.cpp updates tokens_predicted_total when a request ends (finished or cancelled).
    stopped_after = None
    while time.monotonic() - t_close < 10:
        m = metrics(ll)
        if m.get("llamacpp:requests_processing", 1) == 0:
            stopped_after = time.monotonic() - t_close
            break
        time.sleep(0.05)
    m1 = metrics(ll)
    time.sleep(1.5)
    m2 = metrics(ll)
    generated = m1["llamacpp:tokens_predicted_total"] - before
    later = m2["llamacpp:tokens_predicted_total"] - m1["llamacpp:tokens_predicted_total"]
    check(
        stopped_after is not None and stopped_after < 3.0,
        "abort: llama.cpp stopped processing promptly",
        f"requests_processing -> 0 {stopped_after:.2f}s after the close" if stopped_after is not None
        else "still processing 10s after the close",
    )
    check(
        generated < ABORT_MAX_TOKENS / 4 and later == 0 and m2.get("llamacpp:requests_processing") == 0,
        "abort: generation stopped well before max_tokens",
        f"tokens_predicted_total grew by {generated:.0f} (of {ABORT_MAX_TOKENS} asked), "
        f"then by {later:.0f} in the next 1.5s",
    )
    return generated


CONTENT_DELTA = re.compile(rb'"content":"(?!")')


def check_random_aborts(px, n=6):
    """Streams the client leaves after a random number k of content deltas: each is billed what
    the client received plus at most the chunks in flight (issue 14), never 0."""
    step(f"{n} streams aborted at random points")
    rng = random.Random(os.environ.get("E2E_SEED", "14"))
    for i in range(n):
        k = rng.randint(1, 24)
        rid = new_id(f"abort-at-{k}")
        body = json.dumps(chat_body(ABORT_MAX_TOKENS, True)).encode()
        s = socket.create_connection(px, timeout=30)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: e2e\r\ncontent-type: application/json\r\n"
            + f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        t0 = time.monotonic()
        while len(CONTENT_DELTA.findall(got)) < k and time.monotonic() - t0 < 30:
            part = s.recv(65536)
            if not part:
                break
            got += part
        s.close()
        received = len(CONTENT_DELTA.findall(got))
        check(received >= k, f"abort-at-{k}: client read {k} tokens before leaving",
              f"{received} content deltas in {len(got)} bytes")
        REQUESTS.append({"name": f"abort-at-{k}", "request_id": rid, "want": None,
                         "outcome": "client_aborted", "stream": True, "resp": None,
                         "received": received})
        time.sleep(0.3)


def check_keepalive(px, ll, gaps=(6.0, 5.0, 4.5)):
    """llama.cpp closes a keep-alive connection after 5 s idle. Requests on one client
    connection (so one proxy core, one upstream pool) with idle gaps around that limit."""
    step(f"llama.cpp's 5 s keep-alive close: requests after idle gaps of {list(gaps)} s")
    pm0, st0 = metrics(px), stale_resends()
    conn = http.client.HTTPConnection(*px, timeout=60)
    errors = []
    statuses = []
    for i in range(len(gaps) + 1):
        if i:
            time.sleep(gaps[i - 1])
        try:
            e = proxied(px, f"keepalive-{i}", "/v1/chat/completions", chat_body(4), conn=conn)
            statuses.append(e["resp"].status)
            if e["resp"].status == 200:
                e["want"] = usage_of(e["resp"].json())
            else:
                errors.append(f"request {i}: status {e['resp'].status} {e['resp'].body[:200]!r}")
        except Exception as ex:
            errors.append(f"request {i}: {type(ex).__name__}: {ex}")
            conn.close()
            conn = http.client.HTTPConnection(*px, timeout=60)
    conn.close()
    pm1, st1 = metrics(px), stale_resends()
    up_err = metric_sum(pm1, "llmproxy_upstream_errors_total") - metric_sum(pm0, "llmproxy_upstream_errors_total")
    retries = metric_sum(pm1, "llmproxy_upstream_retries_total") - metric_sum(pm0, "llmproxy_upstream_retries_total")
    check(
        not errors and statuses == [200] * (len(gaps) + 1),
        "keep-alive: no client-visible error after idle gaps around llama.cpp's 5 s close",
        f"statuses {statuses}; proxy upstream errors +{up_err:.0f}, retries +{retries:.0f}, "
        f"stale pooled connections re-sent +{(st1 or 0) - (st0 or 0) if st0 is not None else '?'}"
        + (f"; errors: {errors}" if errors else ""),
    )


def check_reuse_after_stream(px, rounds=3):
    """llama.cpp closes the connection right after every streamed (chunked) response, although
    it announced `Keep-Alive: timeout=5, max=100` and no `Connection: close`: the proxy pools a
    connection that is already closed, and the next request on that core meets it at once."""
    step(f"a request right after a stream, {rounds} times on one client connection")
    st0 = stale_resends()
    conn = http.client.HTTPConnection(*px, timeout=60)
    errors, statuses = [], []
    for i in range(rounds):
        for kind, body in (("stream", chat_body(4, True)), ("then", chat_body(4))):
            name = f"reuse-{i}-{kind}"
            try:
                e = proxied(px, name, "/v1/chat/completions", body, conn=conn)
                r = e["resp"]
                statuses.append(r.status)
                if r.status != 200:
                    errors.append(f"{name}: status {r.status} {r.body[:200]!r}")
                elif kind == "stream":
                    ev = parse_stream(r.body)
                    e["want"] = stream_want(ev, 4)
                    if not ev or ev[-1][0] != "[DONE]":
                        errors.append(f"{name}: stream did not end with [DONE]")
                else:
                    e["want"] = usage_of(r.json())
            except Exception as ex:
                errors.append(f"{name}: {type(ex).__name__}: {ex}")
                conn.close()
                conn = http.client.HTTPConnection(*px, timeout=60)
    conn.close()
    st1 = stale_resends()
    check(
        not errors and statuses == [200] * (2 * rounds),
        "reuse after stream: no client-visible error when the pooled connection was closed by llama.cpp",
        f"statuses {statuses}; stale pooled connections re-sent "
        f"+{(st1 or 0) - (st0 or 0) if st0 is not None else '?'}"
        + (f"; errors: {errors}" if errors else ""),
    )


def check_connection_max(px, n=110):
    """llama.cpp closes a keep-alive connection after 100 requests (Keep-Alive: max=100)."""
    step(f"{n} sequential requests on one client connection (llama.cpp's keep-alive max=100)")
    conn = http.client.HTTPConnection(*px, timeout=30)
    bad = []
    t0 = time.monotonic()
    for i in range(n):
        try:
            r = request(px, "GET", "/v1/models", conn=conn)
            if r.status != 200:
                bad.append((i, r.status))
        except Exception as ex:
            bad.append((i, f"{type(ex).__name__}: {ex}"))
            conn.close()
            conn = http.client.HTTPConnection(*px, timeout=30)
    conn.close()
    check(not bad, "keep-alive max: no client-visible error past llama.cpp's 100 requests per connection",
          f"{n} GET /v1/models in {time.monotonic() - t0:.2f}s" + (f"; failures {bad[:5]}" if bad else ""))


def load_events(path):
    events = []
    posts = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                posts += 1
                body = json.loads(line)["body"]
                if isinstance(body, dict) and "events" in body:
                    events.extend(body["events"])
                elif isinstance(body, dict):
                    events.append(body)
    except FileNotFoundError:
        pass
    return posts, events


def check_events(events_file, abort_generated):
    step("usage events at the webhook receiver")
    want_ids = {e["request_id"] for e in REQUESTS}
    deadline = time.monotonic() + 15
    while True:
        posts, events = load_events(events_file)
        have = {ev.get("request_id") for ev in events}
        if want_ids <= have or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # anything duplicated would arrive within a few flush intervals
    posts, events = load_events(events_file)
    by_id = {}
    for ev in events:
        by_id.setdefault(ev.get("request_id"), []).append(ev)
    stray = [rid for rid in by_id if rid not in want_ids]
    check(
        not stray and len(events) == len(REQUESTS),
        "events: one per proxied request and no others",
        f"{len(events)} events in {posts} POSTs for {len(REQUESTS)} requests"
        + (f"; unexpected request_ids {stray[:5]}" if stray else ""),
    )
    leaks = []
    for path in (events_file, PROXY_LOG):
        if path:
            with open(path, encoding="utf-8", errors="replace") as f:
                if API_KEY in f.read():
                    leaks.append(path)
    check(not leaks, "events and proxy log never contain a raw API key",
          f"searched {events_file} and {PROXY_LOG}" + (f"; FOUND in {leaks}" if leaks else ""))
    ids = [ev.get("event_id") for ev in events]
    check(len(set(ids)) == len(ids) and all(isinstance(i, str) and len(i) == 32 for i in ids),
          "events: event_id unique, 32 hex", f"{len(set(ids))} distinct")
    for e in REQUESTS:
        evs = by_id.get(e["request_id"], [])
        name = e["name"]
        if not check(len(evs) == 1, f"{name}: exactly one usage event", f"{len(evs)} for {e['request_id']}"):
            continue
        ev = evs[0]
        fields = (f"prompt={ev.get('prompt_tokens')} completion={ev.get('completion_tokens')} "
                  f"total={ev.get('total_tokens')} cached={ev.get('cached_tokens')} "
                  f"outcome={ev.get('outcome')} status={ev.get('status')} is_stream={ev.get('is_stream')}")
        problems = []
        if e["outcome"] is not None and ev.get("outcome") != e["outcome"]:
            problems.append(f"outcome {ev.get('outcome')} != {e['outcome']}")
        if ev.get("is_stream") != e["stream"]:
            problems.append(f"is_stream {ev.get('is_stream')} != {e['stream']}")
        if e.get("user_id") and ev.get("user_id") != e["user_id"]:
            problems.append(f"user_id {ev.get('user_id')} != {e['user_id']}")
        if ev.get("key_id") != e.get("key_id"):
            problems.append(f"key_id {ev.get('key_id')} != {e.get('key_id')}")
        if e.get("status", 200) != 200:
            if ev.get("status") != e["status"]:
                problems.append(f"status {ev.get('status')} != {e['status']}")
            fields += f" | client got {e['status']}"
        if ev.get("total_tokens") != (ev.get("prompt_tokens") or 0) + (ev.get("completion_tokens") or 0):
            problems.append("total != prompt + completion")
        if e.get("status", 200) != 200:
            pass
        elif e["outcome"] == "ok":
            if ev.get("status") != 200:
                problems.append(f"status {ev.get('status')}")
            want = e.get("want")
            if not want:
                problems.append("no server-reported usage to compare with")
            else:
                for k, v in want.items():
                    if v is not None and ev.get(k) != v:
                        problems.append(f"{k} {ev.get(k)} != server's {v}")
            fields += f" | server said {want}"
        elif "received" in e:
            # Aborted at a random point: billed what the client received, plus at most the
            # chunks that were in flight when the proxy saw it leave.
            got = ev.get("completion_tokens") or 0
            if not e["received"] <= got <= e["received"] + 8:
                problems.append(f"completion {got} not within [{e['received']}, {e['received'] + 8}]")
            # The proxy learnt from the complete streams before that this server reports its
            # timings at the end only, and asked for them on every chunk (`timings_per_token`):
            # the server's own running counts, prompt and cached tokens included.
            if ev.get("usage_source") != "reported":
                problems.append(f"usage_source {ev.get('usage_source')}, not the server's own counts")
            prompt = SERVER_PROMPT.get("chat")
            if prompt and ev.get("prompt_tokens") != prompt:
                problems.append(f"prompt {ev.get('prompt_tokens')} != server's {prompt}")
            fields += f" | client received {e['received']} tokens, source {ev.get('usage_source')}"
        else:
            # Aborted: usage arrives only at the end of a stream, so what was billed is at most
            # what the server generated.
            if (ev.get("completion_tokens") or 0) > abort_generated:
                problems.append("more completion tokens than the server generated")
            fields += f" | server generated {abort_generated:.0f} tokens before it stopped"
        check(not problems, f"{name}: usage event", fields + (f" -- {problems}" if problems else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", required=True, help="host:port")
    ap.add_argument("--llama", required=True, help="host:port")
    ap.add_argument("--events", required=True, help="the receiver's JSON-lines file")
    ap.add_argument("--proxy-log", help="the proxy's log file (debug level)")
    args = ap.parse_args()
    global PROXY_LOG
    PROXY_LOG = args.proxy_log
    px = (args.proxy.rsplit(":", 1)[0], int(args.proxy.rsplit(":", 1)[1]))
    ll = (args.llama.rsplit(":", 1)[0], int(args.llama.rsplit(":", 1)[1]))
    t0 = time.monotonic()
    abort_generated = 0
    try:
        step("non-streamed chat and completions")
        check_nonstream(px, ll, "chat", "/v1/chat/completions", chat_body(SMALL), "message")
        check_nonstream(px, ll, "completion", "/v1/completions", completion_body(SMALL), "text")
        check_streams(px, ll)
        check_concurrent(px, ll)
        check_context_exceeded(px, ll)
        abort_generated = check_abort(px, ll)
        check_random_aborts(px)
        check_reuse_after_stream(px)
        check_keepalive(px, ll)
        check_connection_max(px)
    except Exception as ex:  # a crash is a failed check, and the events are still examined
        import traceback

        traceback.print_exc()
        check(False, "checks ran to the end", f"{type(ex).__name__}: {ex}")
    check_events(args.events, abort_generated)
    failed = sum(1 for ok, _, _ in RESULTS if not ok)
    passed = len(RESULTS) - failed
    print(f"\n=== summary ({time.monotonic() - t0:.1f}s of checks) ===")
    for ok, name, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    for n in NOTES:
        print(f"NOTE  {n}")
    print(f"e2e: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
