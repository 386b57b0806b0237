#!/usr/bin/env python3
"""Acceptance test of an OpenAI-compatible server (`quarry serve`) with the real `openai` client.

    PYTHONPATH="$(scripts/python-deps)" python3 tests/serve/openai_acceptance.py \\
        --base-url http://127.0.0.1:8080/v1 --model-path MODEL.gguf --quarry target/release/quarry

Run by crates/quarry-cli/tests/serve_openai.rs against a `quarry serve` it starts. Every check
runs (a failing one does not stop the others); the exit status is 1 when any failed, and a line
per check says which and why. Checks:

  models       GET /v1/models lists the served model
  health       GET /health answers 200
  tokenize     POST /tokenize and /detokenize agree with `quarry tokenize` and round-trip
  completions  non-streaming greedy: shape, usage (prompt_tokens = `quarry tokenize`'s count,
               total = prompt + completion), finish_reason
  stream       streaming completions and chat reassemble to the non-streaming greedy text, same
               finish_reason; stream_options.include_usage sends one usage chunk (no choices)
               equal to the non-streaming usage
  chat         chat completions: assistant message, usage, finish_reason
  length       max_tokens -> finish_reason "length" with exactly max_tokens completion tokens
               (completions and chat)
  logprobs     completions logprobs=k and chat logprobs + top_logprobs=k: one entry per token,
               values <= 0, top lists of k sorted descending, the greedy choice is the top one,
               tokens concatenate to the text; streamed chat logprobs equal the non-streamed
  stop         stop as a string and as a list (completions, chat, streaming): the output is the
               greedy text cut before the earliest stop string, which it does not contain, and
               finish_reason is "stop"
  n            n=2: two choices with indices 0 and 1 (greedy: equal texts; sampled with a seed:
               valid), usage counts both completions; streamed n=2 reassembles per index
  echo         completions echo=true: the prompt followed by the greedy completion
  quarry-run   greedy /v1/completions text equals `quarry run MODEL PROMPT -n N --temperature 0
               --json` (text, token count, finish_reason) on a couple of prompts
  disconnect   a streaming client that hangs up after a few chunks of a long generation: within
               1.5 s its KV blocks are freed and its sequence stops (the KV-blocks-used and
               running-sequences gauges of /metrics return to 0), long before the request
               would have ended by itself

--skip NAME[,NAME] leaves checks out (e.g. to try the script against another server); without
--quarry the checks that run the binary (tokenize's comparison, usage's, quarry-run) use the
server's /tokenize or are skipped.
"""
import argparse
import json
import math
import re
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

try:
    import openai
except ImportError:
    sys.exit("openai_acceptance.py: the `openai` package is missing: run scripts/python-deps and put "
             "the directory it prints on PYTHONPATH (scripts/test does both)")

# Prompts whose greedy continuations on SmolLM2-135M do not end within a few dozen tokens.
PROMPT = "The capital of France is"
RUN_PROMPTS = ["The capital of France is", "Once upon a time, there was a little"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


class CheckFailed(Exception):
    pass


def check(cond, msg, *details):
    if not cond:
        raise CheckFailed(msg + "".join(f"\n      {d}" for d in details))


def eq(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


class Ctx:
    def __init__(self, a):
        self.a = a
        self.base = a.base_url.rstrip("/")
        self.root = re.sub(r"/v1$", "", self.base)
        self.client = openai.OpenAI(base_url=self.base, api_key=a.api_key, max_retries=0,
                                    timeout=a.timeout)
        self.model = None
        self._tok_cache = {}
        self._greedy = {}

    # --- helpers --------------------------------------------------------------------------
    def http(self, method, path, body=None):
        """(status, parsed JSON or text) of a plain HTTP request to the server root."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.a.api_key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.a.timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        text = raw.decode("utf-8", "replace")
        if "json" in ctype:
            try:
                return status, json.loads(text)
            except ValueError:
                pass
        return status, text

    def prompt_ids(self, text):
        """Token ids of a completions prompt, as `quarry tokenize` counts them (or /tokenize)."""
        if text not in self._tok_cache:
            if self.a.quarry:
                out = subprocess.run([self.a.quarry, "tokenize", self.a.model_path, text, "--json"],
                                     check=True, capture_output=True, text=True).stdout
                self._tok_cache[text] = json.loads(out)["ids"]
            else:
                status, v = self.http("POST", "/tokenize", {"content": text})
                check(status == 200, f"/tokenize: status {status}: {v}")
                self._tok_cache[text] = v["tokens"]
        return self._tok_cache[text]

    def complete(self, prompt=PROMPT, **kw):
        kw.setdefault("max_tokens", 16)
        kw.setdefault("temperature", 0)
        return self.client.completions.create(model=self.model, prompt=prompt, **kw)

    def chat(self, messages=CHAT, **kw):
        kw.setdefault("max_tokens", 16)
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(model=self.model, messages=messages, **kw)

    def greedy_completion(self, prompt=PROMPT, n=16):
        key = ("c", prompt, n)
        if key not in self._greedy:
            self._greedy[key] = self.complete(prompt, max_tokens=n)
        return self._greedy[key]

    def greedy_chat(self, n=16):
        key = ("chat", n)
        if key not in self._greedy:
            self._greedy[key] = self.chat(max_tokens=n)
        return self._greedy[key]

    def metrics(self):
        status, text = self.http("GET", "/metrics")
        check(status == 200, f"/metrics: status {status}")
        check(isinstance(text, str), "/metrics: not Prometheus text")
        return parse_prometheus(text)


def parse_prometheus(text):
    """{'name{labels}': value} for every sample line (labels as written, sorted)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)', line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        if labels:
            pairs = sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
            labels = "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"
        try:
            out[name + labels] = float(value)
        except ValueError:
            pass
    return out


def find_metric(samples, explicit, must, what):
    """The one sample named `explicit`, or the one whose name+labels contains every word in
    `must` (case-insensitive); fails listing the candidates otherwise."""
    if explicit:
        check(explicit in samples, f"/metrics has no sample {explicit!r}",
              f"samples: {sorted(samples)}")
        return explicit
    hits = [k for k in samples if all(w in k.lower() for w in must)
            and not k.split("{")[0].endswith(("_bucket", "_sum", "_count", "_created"))]
    check(len(hits) == 1, f"/metrics: cannot tell which sample is {what} (words {must}); "
          f"candidates {hits}; pass it explicitly", f"samples: {sorted(samples)}")
    return hits[0]


# --- checks ---------------------------------------------------------------------------------
def check_models(c):
    models = c.client.models.list().data
    check(len(models) >= 1, "/v1/models lists no model")
    for m in models:
        check(isinstance(m.id, str) and m.id, f"model without an id: {m}")
    c.model = models[0].id


def check_health(c):
    status, _ = c.http("GET", "/health")
    eq(status, 200, "/health status")


def check_tokenize(c):
    for text in ["Hello world", PROMPT, "naïve café — 東京 🙂"]:
        status, v = c.http("POST", "/tokenize", {"content": text})
        eq(status, 200, f"/tokenize {text!r} status")
        check(isinstance(v, dict) and isinstance(v.get("tokens"), list), f"/tokenize shape: {v!r}")
        if c.a.quarry:
            eq(v["tokens"], c.prompt_ids(text), f"/tokenize {text!r} vs quarry tokenize")
        status, d = c.http("POST", "/detokenize", {"tokens": v["tokens"]})
        eq(status, 200, "/detokenize status")
        check(isinstance(d, dict) and isinstance(d.get("content"), str), f"/detokenize shape: {d!r}")
        # A leading BOS (when the model adds one) detokenizes to nothing or to its text.
        check(d["content"].endswith(text), f"/detokenize round trip: {d['content']!r} vs {text!r}")


def check_usage(u, what, prompt_tokens=None, completion_tokens=None):
    check(u is not None, f"{what}: no usage")
    check(u.prompt_tokens > 0 and u.completion_tokens >= 0, f"{what}: usage {u}")
    eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, f"{what}: total_tokens")
    if prompt_tokens is not None:
        eq(u.prompt_tokens, prompt_tokens, f"{what}: usage.prompt_tokens")
    if completion_tokens is not None:
        eq(u.completion_tokens, completion_tokens, f"{what}: usage.completion_tokens")


def check_completions(c):
    r = c.greedy_completion()
    eq(r.object, "text_completion", "object")
    check(isinstance(r.id, str) and r.id, "id missing")
    eq(len(r.choices), 1, "number of choices")
    ch = r.choices[0]
    eq(ch.index, 0, "choice index")
    check(isinstance(ch.text, str) and ch.text, f"empty text: {ch.text!r}")
    check(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
    check_usage(r.usage, "completions", prompt_tokens=len(c.prompt_ids(PROMPT)))
    if ch.finish_reason == "length":
        eq(r.usage.completion_tokens, 16, "completion_tokens at finish_reason length")
    else:
        check(r.usage.completion_tokens <= 16, f"completion_tokens {r.usage.completion_tokens} > 16")
    # The same greedy request again gives the same text.
    eq(c.complete(max_tokens=16).choices[0].text, ch.text, "a repeated greedy request's text")


def collect_stream(stream, kind):
    """(text per choice index, finish_reason per index, usage or None, number of chunks with
    content, chat logprob entries per index) of a completions/chat stream."""
    texts, finish, usage, content_chunks, lps = {}, {}, None, 0, {}
    saw_usage_before_end = False
    for chunk in stream:
        if usage is not None:
            saw_usage_before_end = True
        if chunk.usage is not None:
            check(not chunk.choices, f"the usage chunk has choices: {chunk}")
            usage = chunk.usage
            continue
        for ch in chunk.choices:
            if kind == "chat":
                piece = ch.delta.content or ""
                if ch.logprobs is not None and ch.logprobs.content:
                    lps.setdefault(ch.index, []).extend(ch.logprobs.content)
            else:
                piece = ch.text or ""
            texts[ch.index] = texts.get(ch.index, "") + piece
            content_chunks += bool(piece)
            if ch.finish_reason is not None:
                check(ch.index not in finish, f"two finish_reasons for choice {ch.index}")
                finish[ch.index] = ch.finish_reason
    check(not saw_usage_before_end, "chunks after the usage chunk")
    return texts, finish, usage, content_chunks, lps


def check_stream(c):
    base = c.greedy_completion()
    s = c.complete(max_tokens=16, stream=True, stream_options={"include_usage": True})
    texts, finish, usage, chunks, _ = collect_stream(s, "completions")
    eq(texts.get(0), base.choices[0].text, "streamed completions text")
    eq(finish.get(0), base.choices[0].finish_reason, "streamed completions finish_reason")
    check_usage(usage, "streamed completions usage", base.usage.prompt_tokens,
                base.usage.completion_tokens)
    check(1 <= chunks <= base.usage.completion_tokens,
          f"{chunks} content chunks for {base.usage.completion_tokens} tokens")
    # Without include_usage: no usage chunk.
    texts, finish, usage, _, _ = collect_stream(c.complete(max_tokens=16, stream=True), "completions")
    eq(texts.get(0), base.choices[0].text, "streamed completions text (no usage)")
    check(usage is None, f"usage sent without stream_options.include_usage: {usage}")

    base = c.greedy_chat()
    seen = list(c.chat(max_tokens=16, stream=True, stream_options={"include_usage": True}))
    check(any(chunk.choices for chunk in seen), "no chat chunk with choices")
    for chunk in seen:
        eq(chunk.object, "chat.completion.chunk", "chat chunk object")
    texts, finish, usage, _, _ = collect_stream(iter(seen), "chat")
    eq(texts.get(0), base.choices[0].message.content, "streamed chat text")
    eq(finish.get(0), base.choices[0].finish_reason, "streamed chat finish_reason")
    roles = [ch.delta.role for chunk in seen for ch in chunk.choices if ch.delta.role]
    check(roles and all(r == "assistant" for r in roles), f"streamed chat roles: {roles}")
    check_usage(usage, "streamed chat usage", base.usage.prompt_tokens, base.usage.completion_tokens)


def check_chat(c):
    r = c.greedy_chat()
    eq(r.object, "chat.completion", "object")
    eq(len(r.choices), 1, "number of choices")
    ch = r.choices[0]
    eq(ch.index, 0, "choice index")
    eq(ch.message.role, "assistant", "message role")
    check(isinstance(ch.message.content, str) and ch.message.content.strip(),
          f"empty content: {ch.message.content!r}")
    check(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
    check_usage(r.usage, "chat")
    # The chat template adds tokens around the message.
    check(r.usage.prompt_tokens > len(c.prompt_ids(CHAT[0]["content"])),
          f"chat prompt_tokens {r.usage.prompt_tokens} not above the bare message's")
    # A system message changes the prompt (SmolLM2's template has a default one: compare lengths
    # only by inequality).
    system = "You answer every question with one short sentence, then stop."
    r2 = c.chat([{"role": "system", "content": system}] + CHAT, max_tokens=4)
    check(r2.usage.prompt_tokens != r.usage.prompt_tokens,
          f"a system message did not change prompt_tokens ({r.usage.prompt_tokens})")


def check_length(c):
    for n in (1, 5):
        r = c.complete(max_tokens=n)
        eq(r.choices[0].finish_reason, "length", f"completions max_tokens={n} finish_reason")
        eq(r.usage.completion_tokens, n, f"completions max_tokens={n} completion_tokens")
        r = c.complete(max_tokens=n, logprobs=1)
        eq(len(r.choices[0].logprobs.tokens), n, f"completions max_tokens={n}: logprob tokens")
    r = c.chat(max_tokens=3)
    eq(r.choices[0].finish_reason, "length", "chat max_tokens=3 finish_reason")
    eq(r.usage.completion_tokens, 3, "chat max_tokens=3 completion_tokens")
    texts, finish, usage, _, _ = collect_stream(
        c.complete(max_tokens=4, stream=True, stream_options={"include_usage": True}), "completions")
    eq(finish.get(0), "length", "streamed max_tokens=4 finish_reason")
    eq(usage.completion_tokens if usage else None, 4, "streamed max_tokens=4 completion_tokens")


def check_top_list(tops, chosen_token, chosen_lp, k, where):
    """tops: [(token, logprob)] in the server's order."""
    check(len(tops) == k, f"{where}: {len(tops)} top logprobs, want {k}: {tops}")
    vals = [lp for _, lp in tops]
    check(all(math.isfinite(v) and v <= 1e-6 for v in vals), f"{where}: top logprobs not <= 0: {vals}")
    check(all(a >= b - 1e-6 for a, b in zip(vals, vals[1:])), f"{where}: top logprobs not sorted: {vals}")
    check(sum(math.exp(v) for v in vals) <= 1 + 1e-3, f"{where}: top probabilities sum over 1: {vals}")
    # Greedy: the chosen token is the most likely one (a tie may pick another top-1 token).
    check(abs(chosen_lp - vals[0]) <= 1e-3, f"{where}: greedy token {chosen_token!r} logprob "
          f"{chosen_lp} is not the top one {tops[0]}")
    toks = [t for t, _ in tops]
    check(chosen_token in toks or abs(vals[0] - vals[min(1, k - 1)]) <= 1e-3,
          f"{where}: greedy token {chosen_token!r} not among the top {toks}")


def check_logprobs(c):
    k = 3
    base = c.greedy_completion()
    r = c.complete(max_tokens=16, logprobs=k)
    ch = r.choices[0]
    eq(ch.text, base.choices[0].text, "completions text with logprobs")
    lp = ch.logprobs
    check(lp is not None, "completions: no logprobs")
    n = r.usage.completion_tokens
    eq(len(lp.tokens), n, "completions: logprobs.tokens length")
    eq(len(lp.token_logprobs), n, "completions: token_logprobs length")
    eq(len(lp.top_logprobs), n, "completions: top_logprobs length")
    eq("".join(lp.tokens), ch.text, "completions: concatenated logprob tokens")
    if lp.text_offset is not None:
        eq(len(lp.text_offset), n, "completions: text_offset length")
        check(all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:])),
              f"completions: text_offset not monotonic: {lp.text_offset}")
    for i, (tok, v, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        check(math.isfinite(v) and v <= 1e-6, f"completions token {i}: logprob {v} not <= 0")
        check_top_list(list(top.items()), tok, v, k, f"completions token {i}")

    base = c.greedy_chat()
    r = c.chat(max_tokens=16, logprobs=True, top_logprobs=k)
    ch = r.choices[0]
    eq(ch.message.content, base.choices[0].message.content, "chat text with logprobs")
    check(ch.logprobs is not None and ch.logprobs.content is not None, "chat: no logprobs.content")
    content = ch.logprobs.content
    eq(len(content), r.usage.completion_tokens, "chat: logprobs.content length")
    if all(e.bytes is not None for e in content):
        joined = b"".join(bytes(e.bytes) for e in content)
        eq(joined.decode("utf-8", "replace"), ch.message.content, "chat: concatenated logprob bytes")
    else:
        eq("".join(e.token for e in content), ch.message.content, "chat: concatenated logprob tokens")
    for i, e in enumerate(content):
        check(math.isfinite(e.logprob) and e.logprob <= 1e-6, f"chat token {i}: logprob {e.logprob}")
        check_top_list([(t.token, t.logprob) for t in e.top_logprobs], e.token, e.logprob, k,
                       f"chat token {i}")
    # logprobs without top_logprobs: entries with empty top lists.
    r = c.chat(max_tokens=4, logprobs=True)
    eq(len(r.choices[0].logprobs.content), r.usage.completion_tokens, "chat logprobs (k=0) length")
    # Streamed: the same entries, one or more per chunk.
    _, _, _, _, lps = collect_stream(
        c.chat(max_tokens=16, logprobs=True, top_logprobs=k, stream=True), "chat")
    got = lps.get(0, [])
    eq([e.token for e in got], [e.token for e in content], "streamed chat logprob tokens")
    for i, (g, w) in enumerate(zip(got, content)):
        check(abs(g.logprob - w.logprob) <= 1e-3,
              f"streamed chat token {i}: logprob {g.logprob}, non-streamed {w.logprob}")
    # Without logprobs: none.
    check(c.greedy_completion().choices[0].logprobs is None, "completions: logprobs without asking")


def stop_strings(text):
    """Two stop strings that occur in `text` after its start: (earlier, later)."""
    # Pieces of 2-3 characters at different places, not at position 0 (an empty output is legal
    # but tells little), each cutting the text at its first occurrence.
    cands = []
    for i in range(1, len(text) - 2):
        s = text[i:i + 3] if i % 2 else text[i:i + 2]
        if s.strip() and text.index(s) == i:
            cands.append((i, s))
    check(len(cands) >= 2, f"greedy text too short to pick stop strings from: {text!r}")
    late = cands[len(cands) * 2 // 3]
    early = cands[len(cands) // 3]
    return early, late


def check_stop(c):
    base = c.greedy_completion(n=24).choices[0].text
    (i1, s1), (i2, s2) = stop_strings(base)
    for stop, cut in [(s2, i2), ([s2, "\u0001never", s1], i1), ([s1], i1)]:
        r = c.complete(max_tokens=24, stop=stop)
        ch = r.choices[0]
        eq(ch.text, base[:cut], f"completions stop={stop!r} text")
        eq(ch.finish_reason, "stop", f"completions stop={stop!r} finish_reason")
        for s in ([stop] if isinstance(stop, str) else stop):
            check(s not in ch.text, f"stop string {s!r} in output {ch.text!r}")
        texts, finish, _, _, _ = collect_stream(c.complete(max_tokens=24, stop=stop, stream=True),
                                                "completions")
        eq(texts.get(0), base[:cut], f"streamed completions stop={stop!r} text")
        eq(finish.get(0), "stop", f"streamed completions stop={stop!r} finish_reason")
    # A stop string that never occurs changes nothing.
    r = c.complete(max_tokens=24, stop=["\u0001never"])
    eq(r.choices[0].text, base, "completions with a stop string that never occurs")

    base = c.greedy_chat(n=24).choices[0].message.content
    (i1, s1), (i2, s2) = stop_strings(base)
    r = c.chat(max_tokens=24, stop=[s2, s1])
    eq(r.choices[0].message.content, base[:i1], f"chat stop={[s2, s1]!r} content")
    eq(r.choices[0].finish_reason, "stop", "chat stop finish_reason")
    texts, finish, _, _, _ = collect_stream(c.chat(max_tokens=24, stop=s2, stream=True), "chat")
    eq(texts.get(0), base[:i2], f"streamed chat stop={s2!r} text")
    eq(finish.get(0), "stop", "streamed chat stop finish_reason")


def check_n(c):
    base = c.greedy_completion()
    r = c.complete(max_tokens=16, n=2)
    eq(sorted(ch.index for ch in r.choices), [0, 1], "n=2 greedy: choice indices")
    for ch in r.choices:
        eq(ch.text, base.choices[0].text, f"n=2 greedy: choice {ch.index} text")
    check_usage(r.usage, "n=2 greedy", base.usage.prompt_tokens, 2 * base.usage.completion_tokens)

    r = c.complete(max_tokens=8, n=2, temperature=0.9, seed=7)
    eq(sorted(ch.index for ch in r.choices), [0, 1], "n=2 sampled: choice indices")
    for ch in r.choices:
        check(isinstance(ch.text, str) and ch.finish_reason in ("stop", "length"),
              f"n=2 sampled: choice {ch.index}: {ch}")
    check_usage(r.usage, "n=2 sampled", base.usage.prompt_tokens)
    check(r.usage.completion_tokens <= 16, f"n=2 sampled: {r.usage.completion_tokens} tokens > 2*8")

    cb = c.greedy_chat()
    r = c.chat(max_tokens=16, n=2)
    eq(sorted(ch.index for ch in r.choices), [0, 1], "chat n=2: choice indices")
    for ch in r.choices:
        eq(ch.message.content, cb.choices[0].message.content, f"chat n=2: choice {ch.index} content")
    check_usage(r.usage, "chat n=2", cb.usage.prompt_tokens, 2 * cb.usage.completion_tokens)

    texts, finish, usage, _, _ = collect_stream(
        c.complete(max_tokens=16, n=2, stream=True, stream_options={"include_usage": True}),
        "completions")
    eq(sorted(texts), [0, 1], "streamed n=2: indices")
    for i in (0, 1):
        eq(texts[i], base.choices[0].text, f"streamed n=2: choice {i} text")
        eq(finish.get(i), base.choices[0].finish_reason, f"streamed n=2: choice {i} finish_reason")
    check_usage(usage, "streamed n=2", base.usage.prompt_tokens, 2 * base.usage.completion_tokens)


def check_echo(c):
    base = c.greedy_completion(n=6)
    r = c.complete(max_tokens=6, echo=True)
    eq(r.choices[0].text, PROMPT + base.choices[0].text, "echo text")
    check_usage(r.usage, "echo", base.usage.prompt_tokens, base.usage.completion_tokens)
    texts, _, _, _, _ = collect_stream(c.complete(max_tokens=6, echo=True, stream=True), "completions")
    eq(texts.get(0), PROMPT + base.choices[0].text, "streamed echo text")


def check_quarry_run(c):
    check(c.a.quarry, "needs --quarry")
    n = 24
    for prompt in RUN_PROMPTS:
        out = subprocess.run([c.a.quarry, "run", c.a.model_path, prompt, "-n", str(n),
                              "--temperature", "0", "--json"],
                             check=True, capture_output=True, text=True).stdout
        want = json.loads(out)
        r = c.complete(prompt, max_tokens=n)
        ch = r.choices[0]
        eq(ch.text, want["text"], f"greedy {prompt!r}: server text vs quarry run")
        eq(r.usage.completion_tokens, len(want["ids"]), f"greedy {prompt!r}: completion tokens")
        eq(r.usage.prompt_tokens, len(want["prompt_ids"]), f"greedy {prompt!r}: prompt tokens")
        eq(ch.finish_reason, want["finish_reason"], f"greedy {prompt!r}: finish_reason")


def check_disconnect(c):
    m0 = c.metrics()
    used = find_metric(m0, c.a.kv_used_metric, ["kv", "block", "used"], "KV blocks used")
    running = find_metric(m0, c.a.running_metric, ["running"], "running sequences")

    def wait_for(pred, seconds, what):
        deadline = time.monotonic() + seconds
        while True:
            m = c.metrics()
            if pred(m):
                return m
            check(time.monotonic() < deadline, f"{what} (after {seconds} s): {used} = {m[used]}, "
                  f"{running} = {m[running]}")
            time.sleep(0.02)

    # Idle first: earlier checks' sequences are all finished.
    wait_for(lambda m: m[used] == 0 and m[running] == 0, 5, "not idle before the test")
    # A greedy continuation that runs to max_tokens (SmolLM2 counts on for thousands of tokens):
    # left alone it would take many seconds, so freeing within `limit` after the hang-up means
    # the server cancelled it rather than finished it.
    max_tokens, limit = 2000, 1.5
    client = openai.OpenAI(base_url=c.base, api_key=c.a.api_key, max_retries=0, timeout=c.a.timeout)
    stream = client.completions.create(model=c.model, prompt=COUNTING, max_tokens=max_tokens,
                                       temperature=0, stream=True)
    times = []
    for chunk in stream:
        if any(ch.text for ch in chunk.choices):
            times.append(time.monotonic())
        check(not any(ch.finish_reason for ch in chunk.choices), f"the stream finished: {chunk}")
        if len(times) >= 6:
            break
    check(len(times) >= 6, "the stream ended before 6 chunks")
    during = c.metrics()
    check(during[used] > 0 and during[running] >= 1,
          f"during a stream: {used} = {during[used]}, {running} = {during[running]}")
    stream.close()
    client.close()
    t_close = time.monotonic()
    # What is left of the request, at the pace its tokens came.
    left_s = (max_tokens - len(times)) * (times[-1] - times[0]) / (len(times) - 1)
    check(left_s > 2 * limit, f"generation is too fast for this check to tell a cancelled request "
          f"from a finished one ({left_s:.1f} s left of {max_tokens} tokens): raise max_tokens")
    wait_for(lambda m: m[used] == 0 and m[running] == 0, limit,
             "KV blocks not freed or the sequence still running after the client hung up")
    freed_s = time.monotonic() - t_close
    print(f"      disconnect: blocks freed {freed_s * 1e3:.0f} ms after the hang-up "
          f"(the request had about {left_s:.0f} s of generation left)", flush=True)


CHECKS = [
    ("models", check_models), ("health", check_health), ("tokenize", check_tokenize),
    ("completions", check_completions), ("chat", check_chat), ("stream", check_stream),
    ("length", check_length), ("logprobs", check_logprobs), ("stop", check_stop), ("n", check_n),
    ("echo", check_echo), ("quarry-run", check_quarry_run), ("disconnect", check_disconnect),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model-path", help="the served GGUF file (for `quarry run`/`quarry tokenize`)")
    p.add_argument("--quarry", help="the quarry binary (checks against `quarry run`/`tokenize`)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--skip", default="", help="comma-separated check names to leave out")
    p.add_argument("--only", default="", help="comma-separated check names to run (models always)")
    p.add_argument("--kv-used-metric", help="the /metrics sample of KV blocks in use "
                   "(default: the one sample whose name has kv, block and used)")
    p.add_argument("--running-metric", help="the /metrics gauge of running sequences "
                   "(default: the one sample whose name has running)")
    a = p.parse_args()
    if a.quarry and not a.model_path:
        p.error("--quarry needs --model-path")
    names = [n for n, _ in CHECKS]
    skip = {s for s in a.skip.split(",") if s}
    only = {s for s in a.only.split(",") if s}
    for s in skip | only:
        if s not in names:
            p.error(f"unknown check {s!r} (known: {', '.join(names)})")
    if not a.quarry:
        skip.add("quarry-run")

    c = Ctx(a)
    failed, t_all = [], time.monotonic()
    for name, fn in CHECKS:
        if name in skip or (only and name not in only and name != "models"):
            print(f"skip {name}", flush=True)
            continue
        t0 = time.monotonic()
        try:
            fn(c)
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        except CheckFailed as e:
            failed.append(name)
            print(f"FAIL {name}: {e}", flush=True)
        except Exception:  # an exception from the client (HTTP error, bad shape) fails the check
            failed.append(name)
            print(f"FAIL {name}: {traceback.format_exc().rstrip()}", flush=True)
        if name == "models" and c.model is None:
            print("cannot go on without a model id", flush=True)
            break
    print(f"{len(failed)} failed ({', '.join(failed) or 'none'}), {time.monotonic() - t_all:.1f} s",
          flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
