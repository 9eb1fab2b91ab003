"""Drives the prefix-reuse workload of benches/prefix_llama.sh through a running proxy.

Six long system prompts; the hottest takes 40% of the requests, the other five share the rest;
each request adds a short question of its own; CLIENTS concurrent clients; no session header.
Prints one JSON line: requests, errors, prefix reuse (sum of llama.cpp's own
usage.prompt_tokens_details.cached_tokens over sum of prompt_tokens), median and p90 latency.
Standard library only.
"""

import json
import random
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


def main():
    url, requests, clients, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prompts = [system_prompt(i) for i in range(6)]
    rng = random.Random(seed)
    # Hottest 40%, the others 12% each.
    plan = [0 if rng.random() < 0.4 else rng.randrange(1, 6) for _ in range(requests)]
    lock = threading.Lock()
    todo = list(enumerate(plan))
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                n, p = todo.pop(0)
            body = {
                "model": "gemma",
                "messages": [
                    {"role": "system", "content": prompts[p]},
                    {"role": "user", "content": f"Question {n}: name a {rng.choice(WORDS)}."},
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
                row = (time.monotonic() - t0, usage["prompt_tokens"], cached)
            except Exception as e:  # counted, reported, and fails the check
                print(f"request {n} failed: {e}", file=sys.stderr)
                row = None
            with lock:
                results.append(row)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r]
    lat = sorted(r[0] for r in ok)
    prompt = sum(r[1] for r in ok)
    print(
        json.dumps(
            {
                "requests": len(ok),
                "errors": len(results) - len(ok),
                "reuse": round(sum(r[2] for r in ok) / max(prompt, 1), 3),
                "median_s": round(statistics.median(lat), 3) if lat else None,
                "p90_s": round(lat[int(len(lat) * 0.9)], 3) if lat else None,
                "wall_s": round(time.monotonic() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
