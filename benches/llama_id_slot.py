"""What a llama.cpp server does with `id_slot` (the member `prefix_cache` pins requests with when
a backend declares `slots`), measured on a running server started as benches/prefix_llama.sh
starts them (`--parallel 2 --cache-ram 0 -t 1`):

    python3 benches/llama_id_slot.py http://127.0.0.1:PORT

1. Slot 0 gets prompt A and slot 1 prompt B (pinned, one at a time).
2. A long request of prompt A (80 tokens out) is pinned to slot 0; while it runs, two more
   requests of prompt A are pinned to slot 0 (busy) and one of prompt B to slot 1 (idle).
   Expected: the two wait for slot 0 (llama.cpp defers a task pinned to a busy slot and hands it
   that slot first when it frees) and are served from its cache; B is served at once.
3. An id_slot beyond the server's slots, -1 and a string: how they are treated.
Prints, per request: sent and done (s since the start), prompt tokens, cached tokens.
Standard library only.
"""

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

WORDS = "river stone cloud lamp garden window paper silver orange winter market".split()
T0 = time.monotonic()


def prompt(i):
    r = random.Random(i)
    return f"Profile {i}: " + " ".join(r.choice(WORDS) for _ in range(560))


def send(url, p, question, slot, tag, max_tokens=4):
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": prompt(p)}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if slot is not None:
        body["id_slot"] = slot
    sent = time.monotonic() - T0
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            usage = json.loads(r.read())["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        out = "done %.2f s, prompt %d, cached %s" % (time.monotonic() - T0, usage["prompt_tokens"], cached)
    except urllib.error.HTTPError as e:
        out = "HTTP %d %s" % (e.code, e.read()[:200])
    print("%-34s id_slot=%-6s sent %.2f s, %s" % (tag, json.dumps(slot), sent, out), flush=True)


def main():
    url = sys.argv[1].rstrip("/")
    send(url, 0, "a", 0, "warm slot 0 with A")
    send(url, 1, "b", 1, "warm slot 1 with B")
    long = threading.Thread(target=send, args=(url, 0, "Write a long story.", 0, "A, 80 tokens, slot 0", 80))
    long.start()
    time.sleep(0.5)
    others = [
        (0, "c", 0, "A pinned to busy slot 0"),
        (0, "d", 0, "A pinned to busy slot 0 (second)"),
        (1, "e", 1, "B pinned to idle slot 1"),
    ]
    threads = [threading.Thread(target=send, args=(url, *o)) for o in others]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in [long] + threads:
        t.join()
    send(url, 0, "x", 5, "A, id_slot beyond the slots")
    send(url, 0, "y", -1, "A, id_slot -1 (any)")
    send(url, 0, "z", "zero", "A, id_slot a string")


if __name__ == "__main__":
    main()
