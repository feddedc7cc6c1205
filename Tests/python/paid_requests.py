#!/usr/bin/env python3
"""Make paid requests with the official `openai` package and print what the client itself saw.

Configuration comes only from the environment, as for any openai client (OPENAI_BASE_URL, OPENAI_API_KEY).
For N rounds it makes one chat completion, one streamed chat completion and one embeddings request of two
inputs, and prints a JSON array on stdout, one element per request, in the order made:

  {"id": <x-emc-request-id>, "kind": "chat", "prompt_tokens": P, "completion_tokens": C}
  {"id": ..., "kind": "stream", "text": "..."}
  {"id": ..., "kind": "embeddings", "inputs": 2, "vectors": 2}

The id is the router's sequence number, the one its receipt carries: this is the client's own log, which a
settlement is checked against. Exit status 0 when every request succeeded, 1 otherwise.
"""

import argparse
import json
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chat-model", default="smollm2-135m-instruct")
    ap.add_argument("--embedding-model", default="all-minilm-l6-v2")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args(argv)

    import openai

    client = openai.OpenAI().with_options(timeout=120.0, max_retries=0)
    log = []

    def request_id(headers):
        value = headers.get("x-emc-request-id")
        if value is None or not value.isdigit():
            raise SystemExit(f"paid_requests: x-emc-request-id is {value!r}")
        return int(value)

    for round_ in range(args.rounds):
        messages = [{"role": "user", "content": f"Name a colour. ({round_})"}]
        raw = client.chat.completions.with_raw_response.create(
            model=args.chat_model, messages=messages, max_tokens=args.max_tokens, temperature=0)
        answer = raw.parse()
        log.append({"id": request_id(raw.headers), "kind": "chat",
                    "prompt_tokens": answer.usage.prompt_tokens, "completion_tokens": answer.usage.completion_tokens})

        with client.chat.completions.with_streaming_response.create(
                model=args.chat_model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True) as streamed:
            text = "".join(line for line in streamed.iter_lines())
            log.append({"id": request_id(streamed.headers), "kind": "stream", "bytes": len(text)})

        raw = client.embeddings.with_raw_response.create(model=args.embedding_model, input=[f"first {round_}", "second"])
        vectors = raw.parse().data
        log.append({"id": request_id(raw.headers), "kind": "embeddings", "inputs": 2, "vectors": len(vectors)})

    print(json.dumps(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
