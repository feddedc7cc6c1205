#!/usr/bin/env python3
"""Drive an OpenAI-compatible endpoint with the official `openai` package.

Configuration comes only from the environment, as for any openai client:
  OPENAI_BASE_URL   e.g. http://127.0.0.1:8080/v1
  OPENAI_API_KEY    any non-empty string unless the endpoint checks keys

Checks (each one is recorded in the JSON summary printed on stdout):
  models           models.list contains the chat model and the embedding model
  chat             chat.completions.create, temperature 0, max_tokens 16: non-empty content, usage
  chat_stream      the same request streamed: more than one chunk, non-empty text, and equal to a
                   non-streamed answer to the same greedy request (temperature 0, seed)
  completions      completions.create: non-empty text
  embeddings       embeddings.create for 2 inputs: 2 vectors of 384 floats with unit norm (1e-3)
  unknown_model    a request naming an unknown model raises openai.NotFoundError
  bad_key          (only with --check-bad-key) a wrong API key raises openai.AuthenticationError
  request_ids      (only with --check-request-ids) every answer, a stream and an error included, carries
                   x-emc-request-id, the router's sequence number (an integer), one more for each request

--skip-chat / --skip-embeddings leave out the chat+completions or the embeddings parts, so one
half can be checked against a server that only serves the other half.

Exit status: 0 when every check passed, 1 when any failed, 2 when the environment is not set.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback

PROMPT = "Say hello in one short sentence."
SEED = 42


class CheckFailed(Exception):
    pass


def require(cond, message):
    if not cond:
        raise CheckFailed(message)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chat-model", default="smollm2-135m-instruct")
    ap.add_argument("--embedding-model", default="all-minilm-l6-v2")
    ap.add_argument("--skip-chat", action="store_true", help="skip chat, streaming and completions checks")
    ap.add_argument("--skip-embeddings", action="store_true", help="skip the embeddings checks")
    ap.add_argument("--skip-unknown-model", action="store_true",
                    help="skip the unknown-model check (raw llama_cpp.server answers any model id with its own model)")
    ap.add_argument("--check-bad-key", action="store_true",
                    help="also check that a wrong API key gives openai.AuthenticationError (endpoint must check keys)")
    ap.add_argument("--check-request-ids", action="store_true",
                    help="also check x-emc-request-id (an EdgeMatrix router's sequence number) on every kind of answer")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    args = ap.parse_args(argv)

    missing = [v for v in ("OPENAI_BASE_URL", "OPENAI_API_KEY") if not os.environ.get(v)]
    if missing:
        print(f"openai_client_check: set {' and '.join(missing)} (e.g. OPENAI_BASE_URL=http://127.0.0.1:8080/v1 "
              f"OPENAI_API_KEY=sk-local)", file=sys.stderr)
        return 2

    try:
        import openai
    except ImportError:
        print("openai_client_check: the `openai` package is not installed (scripts/setup-models.sh installs it)",
              file=sys.stderr)
        return 2

    client = openai.OpenAI()          # OPENAI_BASE_URL and OPENAI_API_KEY from the environment only
    client = client.with_options(timeout=args.timeout, max_retries=0)

    summary = {
        "ok": False,
        "base_url": str(client.base_url),
        "openai_version": openai.__version__,
        "chat_model": None if args.skip_chat else args.chat_model,
        "embedding_model": None if args.skip_embeddings else args.embedding_model,
        "checks": {},
        "failures": [],
    }
    state = {}

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            detail = fn() or {}
            summary["checks"][name] = {"ok": True, "ms": round((time.perf_counter() - t0) * 1000, 1), **detail}
        except CheckFailed as exc:
            fail(name, str(exc), t0)
        except openai.APIStatusError as exc:
            fail(name, f"{type(exc).__name__} (HTTP {exc.status_code}): {exc.message}", t0)
        except openai.APIConnectionError as exc:
            fail(name, f"{type(exc).__name__}: cannot reach {client.base_url}: {exc}", t0)
        except Exception as exc:  # noqa: BLE001 - any surprise is a failed check, with its traceback on stderr
            traceback.print_exc(file=sys.stderr)
            fail(name, f"{type(exc).__name__}: {exc}", t0)

    def fail(name, message, t0):
        summary["checks"][name] = {"ok": False, "ms": round((time.perf_counter() - t0) * 1000, 1), "error": message}
        summary["failures"].append(f"{name}: {message}")
        print(f"FAIL {name}: {message}", file=sys.stderr)

    chat_request = dict(
        model=args.chat_model,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=16,
        seed=SEED,
    )

    # -- models ------------------------------------------------------------------------------
    def check_models():
        ids = [m.id for m in client.models.list()]
        wanted = ([] if args.skip_chat else [args.chat_model]) + ([] if args.skip_embeddings else [args.embedding_model])
        missing_ids = [w for w in wanted if w not in ids]
        require(not missing_ids, f"models.list lacks {missing_ids}; it lists {ids}")
        return {"ids": ids}

    # -- chat --------------------------------------------------------------------------------
    def check_chat():
        resp = client.chat.completions.create(**chat_request)
        require(resp.choices, "no choices in the chat completion")
        content = resp.choices[0].message.content
        require(isinstance(content, str) and content.strip(), f"empty chat content: {content!r}")
        u = resp.usage
        require(u is not None, "chat completion has no usage")
        require(u.prompt_tokens > 0 and u.completion_tokens > 0,
                f"usage counts must be positive: {u.model_dump()}")
        require(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage does not add up: {u.model_dump()}")
        require(u.completion_tokens <= 16, f"max_tokens=16 exceeded: completion_tokens={u.completion_tokens}")
        state["chat_text"] = content
        return {"content": content, "finish_reason": resp.choices[0].finish_reason, "usage": u.model_dump()}

    def check_chat_stream():
        chunks, parts, finish = 0, [], None
        stream = client.chat.completions.create(**chat_request, stream=True)
        for chunk in stream:
            chunks += 1
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        text = "".join(parts)
        require(chunks > 1, f"stream gave {chunks} chunk(s); want more than 1")
        require(text.strip(), "streamed text is empty")
        # llama.cpp reuses its KV cache between requests, and a greedy answer can change with how much
        # of the prompt was cached; ask the non-streamed request again right after the stream so both
        # see the same cache state, and report whether the first non-streamed answer matched too.
        again = client.chat.completions.create(**chat_request).choices[0].message.content
        require(text == again,
                f"streamed text differs from the non-streamed text of the same greedy request: "
                f"stream={text!r} non-stream={again!r}")
        return {"chunks": chunks, "content_deltas": len(parts), "text": text, "finish_reason": finish,
                "matches_first_non_stream": text == state.get("chat_text")}

    def check_completions():
        resp = client.completions.create(model=args.chat_model, prompt="Once upon a time", max_tokens=16,
                                          temperature=0, seed=SEED)
        require(resp.choices, "no choices in the completion")
        text = resp.choices[0].text
        require(isinstance(text, str) and text.strip(), f"empty completion text: {text!r}")
        return {"text": text, "usage": resp.usage.model_dump() if resp.usage else None}

    # -- embeddings ----------------------------------------------------------------------------
    def check_embeddings():
        inputs = ["The cat sits on the mat.", "EdgeMatrix serves models at the edge."]
        resp = client.embeddings.create(model=args.embedding_model, input=inputs)   # client asks for base64
        require(len(resp.data) == 2, f"want 2 embeddings, got {len(resp.data)}")
        vecs = []
        for i, d in enumerate(sorted(resp.data, key=lambda d: d.index)):
            require(d.index == i, f"embedding indexes are {[x.index for x in resp.data]}")
            v = d.embedding
            require(isinstance(v, list) and len(v) == 384, f"embedding {i}: want 384 floats, got {len(v)}")
            require(all(isinstance(x, float) and math.isfinite(x) for x in v), f"embedding {i}: non-finite values")
            norm = math.sqrt(sum(x * x for x in v))
            require(abs(norm - 1.0) <= 1e-3, f"embedding {i}: norm {norm}, want 1 within 1e-3")
            vecs.append(v)
        require(vecs[0] != vecs[1], "the two different inputs gave the same vector")
        # Same request as JSON floats, and a repeat: informational (exact equality is this project's
        # embeddings server's promise, not an OpenAI one).
        as_float = client.embeddings.create(model=args.embedding_model, input=inputs, encoding_format="float")
        float_vecs = [d.embedding for d in sorted(as_float.data, key=lambda d: d.index)]
        repeat = client.embeddings.create(model=args.embedding_model, input=inputs)
        repeat_vecs = [d.embedding for d in sorted(repeat.data, key=lambda d: d.index)]
        cosine = sum(a * b for a, b in zip(vecs[0], vecs[1]))
        return {"count": len(vecs), "dims": len(vecs[0]), "cosine_0_1": round(cosine, 6),
                "usage": resp.usage.model_dump() if resp.usage else None,
                "float_equals_base64": float_vecs == vecs, "repeat_bit_identical": repeat_vecs == vecs}

    # -- errors --------------------------------------------------------------------------------
    def check_unknown_model():
        bogus = "no-such-model-edgematrix-check"
        tried = {}
        calls = []
        if not args.skip_chat:
            calls.append(("chat", lambda: client.chat.completions.create(
                model=bogus, messages=[{"role": "user", "content": "hi"}], max_tokens=1)))
        if not args.skip_embeddings:
            calls.append(("embeddings", lambda: client.embeddings.create(model=bogus, input="hi")))
        for what, call in calls:
            try:
                call()
            except openai.NotFoundError as exc:
                tried[what] = {"status": exc.status_code, "message": exc.message}
                continue
            except openai.APIStatusError as exc:
                raise CheckFailed(f"{what} with unknown model: want NotFoundError (404), "
                                  f"got {type(exc).__name__} (HTTP {exc.status_code}): {exc.message}")
            raise CheckFailed(f"{what} with unknown model {bogus!r} succeeded; want openai.NotFoundError")
        return {"results": tried}

    def check_bad_key():
        bad = client.with_options(api_key="sk-edgematrix-wrong-key")
        try:
            bad.models.list()
        except openai.AuthenticationError as exc:
            return {"status": exc.status_code}
        except openai.APIStatusError as exc:
            raise CheckFailed(f"wrong key: want AuthenticationError (401), got {type(exc).__name__} "
                              f"(HTTP {exc.status_code})")
        raise CheckFailed("a wrong API key was accepted")

    def check_request_ids():
        def request_id(headers, what):
            value = headers.get("x-emc-request-id")
            require(value is not None and value.isdigit(), f"{what}: x-emc-request-id is {value!r}; want the router's sequence number")
            return int(value)

        ids = []
        raw = client.chat.completions.with_raw_response.create(**chat_request)
        raw.parse()
        ids.append(request_id(raw.headers, "chat"))
        with client.chat.completions.with_streaming_response.create(**chat_request, stream=True) as streamed:
            for _ in streamed.iter_lines():
                pass
            ids.append(request_id(streamed.headers, "chat stream"))
        raw = client.embeddings.with_raw_response.create(model=args.embedding_model, input="request id")
        raw.parse()
        ids.append(request_id(raw.headers, "embeddings"))
        try:
            client.chat.completions.create(model="no-such-model-edgematrix-check", messages=[{"role": "user", "content": "x"}])
            raise CheckFailed("a request for an unknown model succeeded")
        except openai.NotFoundError as exc:
            ids.append(request_id(exc.response.headers, "error answer"))
        require(ids == list(range(ids[0], ids[0] + len(ids))), f"sequence numbers are not one more per request: {ids}")
        return {"ids": ids}

    run("models", check_models)
    if not args.skip_chat:
        run("chat", check_chat)
        run("chat_stream", check_chat_stream)
        run("completions", check_completions)
    if not args.skip_embeddings:
        run("embeddings", check_embeddings)
    if not args.skip_unknown_model and not (args.skip_chat and args.skip_embeddings):
        run("unknown_model", check_unknown_model)
    if args.check_bad_key:
        run("bad_key", check_bad_key)
    if args.check_request_ids and not (args.skip_chat or args.skip_embeddings):
        run("request_ids", check_request_ids)

    summary["ok"] = not summary["failures"]
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["failures"]:
        print(f"openai_client_check: {len(summary['failures'])} check(s) failed against {client.base_url}:",
              file=sys.stderr)
        for f in summary["failures"]:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"openai_client_check: all {len(summary['checks'])} checks passed against {client.base_url}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
