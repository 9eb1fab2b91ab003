"""Drives the prefix-reuse workload of benches/prefix_llama.sh through a running proxy.

Six long system prompts; the hottest takes 40% of the requests, the other five share the rest;
each request adds a short question of its own; CLIENTS concurrent clients; no session header.
First a warm-up, not measured: each system prompt once, one at a time (the strategy places them;
no router can avoid a prompt's first prefill, so counting those would only blur the
comparison). Then the measured requests: the same sequence for every strategy (plan and
questions are fixed by SEED, whatever order the clients take them in).
Prints one JSON line: requests, errors, prefix reuse (sum of llama.cpp's own
usage.prompt_tokens_details.cached_tokens over sum of prompt_tokens), median and p90 latency.
With a METRICS_URL argument it also reads the proxy's requests per backend after the warm-up
and reports the measured requests' share per backend ("per_backend"), and the proxy's routing
decisions by reason over the measured requests ("decisions").
Standard library only.
"""

import json
import random
import re
import statistics
import sys
import threading
import time
import urllib.request

WORDS = (
    "river stone cloud lamp garden window paper silver orange winter market signal harbor "
    "forest engine violet ladder candle mirror rocket desert pillow thunder meadow bridge"
).split()


def system_prompt(i):
    rng = random.Random(1000 + i)
    # Distinct from the first word: prompts share no leading block.
    head = f"Assistant profile {i}: " + " ".join(rng.choice(WORDS) for _ in range(8))
    return head + ". " + " ".join(rng.choice(WORDS) for _ in range(560))


def per_backend(metrics_url):
    """Requests per backend so far, from the proxy's llmproxy_requests_total."""
    counts = {}
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            m = re.match(r'llmproxy_requests_total\{[^}]*backend="([^"]+)"[^}]*\} (\d+)', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return counts


def decisions(metrics_url):
    """The proxy's routing decisions so far, by reason (every strategy's)."""
    counts = {}
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            m = re.match(r'llmproxy_routing_decisions_total\{reason="([^"]+)"[^}]*\} (\d+)', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return counts


def settled(metrics_url, total):
    """Requests per backend once the proxy's counters show `total` requests (cores publish
    their counts on a tick, so the last ones may lag a moment; at most 5 s)."""
    for _ in range(50):
        counts = per_backend(metrics_url)
        if sum(counts.values()) >= total:
            break
        time.sleep(0.1)
    return counts


def send(url, prompts, p, question):
    """One request; (latency, prompt tokens, cached tokens) or None on failure."""
    body = {
        "model": "gemma",
        "messages": [
            {"role": "system", "content": prompts[p]},
            {"role": "user", "content": question},
        ],
        "max_tokens": 4,
        "temperature": 0,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        usage = out["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return (time.monotonic() - t0, usage["prompt_tokens"], cached)
    except Exception as e:  # counted, reported, and fails the check
        print(f"request failed: {e}", file=sys.stderr)
        return None


def main():
    url, requests, clients, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    metrics_url = sys.argv[5] if len(sys.argv) > 5 else None
    prompts = [system_prompt(i) for i in range(6)]
    rng = random.Random(seed)
    # Hottest 40%, the others 12% each; every request's question fixed here too.
    plan = [
        (0 if rng.random() < 0.4 else rng.randrange(1, 6), rng.choice(WORDS))
        for _ in range(requests)
    ]
    warm_failed = sum(
        send(url, prompts, p, f"Warm-up: name a {WORDS[p]}.") is None for p in range(len(prompts))
    )
    before = settled(metrics_url, len(prompts)) if metrics_url else {}
    decided = decisions(metrics_url) if metrics_url else {}
    lock = threading.Lock()
    todo = list(enumerate(plan))
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                n, (p, word) = todo.pop(0)
            row = send(url, prompts, p, f"Question {n}: name a {word}.")
            with lock:
                results.append(row)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    ok = [r for r in results if r]
    lat = sorted(r[0] for r in ok)
    prompt = sum(r[1] for r in ok)
    shares = []
    reasons = {}
    if metrics_url:
        after = settled(metrics_url, sum(before.values()) + len(results))
        shares = [after[b] - before.get(b, 0) for b in sorted(after)]
        reasons = {k: v - decided.get(k, 0) for k, v in decisions(metrics_url).items()}
        reasons = {k: v for k, v in reasons.items() if v}
    print(
        json.dumps(
            {
                "requests": len(ok),
                "errors": len(results) - len(ok) + warm_failed,
                "per_backend": shares,
                "decisions": reasons,
                "reuse": round(sum(r[2] for r in ok) / max(prompt, 1), 3),
                "median_s": round(statistics.median(lat), 3) if lat else None,
                "p90_s": round(lat[int(len(lat) * 0.9)], 3) if lat else None,
                "wall_s": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
