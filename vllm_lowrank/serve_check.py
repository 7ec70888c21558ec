"""``vllm serve`` with the lowrank backend, checked through its OpenAI API.

Starts ``vllm serve MODEL --attention-backend lowrank --additional-config '{"lowrank": ...}'`` (vLLM's
defaults otherwise: on a GPU, CUDA graphs and torch.compile), waits for ``/health``, then sends four
greedy requests, each with a cold prompt (its own ``cache_salt``): completions and chat completions,
each plain and streamed. Each must return the requested number of tokens, a streamed reply must equal
the plain one, and the server's log must name the lowrank formats. A fifth request repeats the plain
completion over its cached prompt; whether it equals the cold reply is reported, not judged (see
:func:`check_server`). One row per request is printed; the exit status is non-zero on any failure.

Models: the embedded SmolLM2-135M (default), a model folder, or ``--shape 8b`` / ``--shape 1b``
(:mod:`vllm_lowrank.shapes`, dummy weights, a random orthonormal basis for the
low-rank formats and the tokenizer of ``--tokenizer``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """vLLM's CLI module run by this Python: what the ``vllm`` entry point runs, but never another
    environment's ``vllm`` on PATH, nor a generated script without a ``__main__`` guard (the GPU kit's
    ``/tmp/site/bin/vllm`` is one: ``vllm serve`` then fails as it spawns its engine)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


@contextlib.contextmanager
def vllm_server(model: str | Path, settings: dict, log_path: Path, *, served_name: str = "model",
                extra: list[str] = (), start_timeout_s: float = 600.0) -> Iterator[str]:
    """A running ``vllm serve`` with the lowrank backend; yields its base URL, stops it on exit."""
    port = free_port()
    cmd = [*vllm_command(), "serve", str(model), "--attention-backend", "lowrank",
           "--additional-config", json.dumps({"lowrank": settings}), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", served_name, *extra]
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited early (rc {proc.returncode}):\n"
                                       f"{log_path.read_text()[-4000:]}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve not healthy after {start_timeout_s:.0f} s")
                time.sleep(2)
            yield base
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _post(url: str, body: dict) -> urllib.request.addinfourl:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=300)


def _events(resp) -> Iterator[dict]:
    """The JSON payloads of a server-sent-event stream, up to ``data: [DONE]``."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


@dataclass
class Reply:
    endpoint: str
    stream: bool
    text: str
    completion_tokens: int
    seconds: float
    chunks: int = 1
    cache: str = "cold"


def ask(base: str, served_name: str, chat: bool, stream: bool, max_tokens: int, cache_salt: str) -> Reply:
    """One greedy request of ``max_tokens`` tokens (EOS ignored) to the completions or chat endpoint.

    ``cache_salt`` (vLLM's per-request prefix-cache key): a fresh one makes the prompt's prefill cold.
    Special tokens are kept in the text, so that a model with dummy weights, which often generates
    nothing else, still shows what it generated.
    """
    endpoint = "chat/completions" if chat else "completions"
    body: dict = {"model": served_name, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                  "cache_salt": cache_salt, "skip_special_tokens": False}
    body.update({"messages": CHAT} if chat else {"prompt": PROMPT})
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    with _post(f"{base}/v1/{endpoint}", body) as resp:
        if not stream:
            reply = json.loads(resp.read())
            choice = reply["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            return Reply(endpoint, False, text, reply["usage"]["completion_tokens"], time.perf_counter() - t0)
        parts, tokens, chunks = [], 0, 0
        for event in _events(resp):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    parts.append(piece)
                    chunks += 1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return Reply(endpoint, True, "".join(parts), tokens, time.perf_counter() - t0, chunks)


def check_server(base: str, served_name: str, max_tokens: int) -> tuple[list[Reply], list[str]]:
    """The four requests, each with a cold prompt, then the plain completion again over its own cached
    prompt (a prefix-cache hit); and the failures found (empty: all good).

    The warm repeat is reported, not judged: with a lossy format it may differ from the cold reply,
    since a cold prompt's first chunk attends over its exact K/V and a cached prompt is read back
    compressed (as every decode step reads it).
    """
    salts = {(chat, stream): uuid.uuid4().hex for chat in (False, True) for stream in (False, True)}
    replies = [ask(base, served_name, chat, stream, max_tokens, salt) for (chat, stream), salt in salts.items()]
    warm = ask(base, served_name, False, False, max_tokens, salts[False, False])
    warm.cache = "warm"
    failures = []
    for r in replies:
        if r.completion_tokens != max_tokens:
            failures.append(f"{r.endpoint} stream={r.stream}: {r.completion_tokens} tokens, asked {max_tokens}")
        if not r.text:  # whitespace is fine: dummy weights answer with arbitrary tokens
            failures.append(f"{r.endpoint} stream={r.stream}: no text")
        if r.stream and r.chunks < 2:
            failures.append(f"{r.endpoint}: the stream came in {r.chunks} chunk(s)")
    for plain, streamed in zip(replies[0::2], replies[1::2]):
        if plain.text != streamed.text:
            failures.append(f"{plain.endpoint}: streamed text differs from the plain reply "
                            f"({plain.text[:60]!r} vs {streamed.text[:60]!r})")
    if warm.completion_tokens != max_tokens:
        failures.append(f"warm repeat: {warm.completion_tokens} tokens, asked {max_tokens}")
    return [*replies, warm], failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--shape", choices=("1b", "8b"), default=None,
                    help="instead of --model: a Llama shape with dummy weights (needs --tokenizer)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for --shape")
    ap.add_argument("--formats", nargs="+", default=["int8"],
                    help="lowrank settings, one server each: preset names or JSON dicts (default: %(default)s)")
    ap.add_argument("--basis", default=None, help="basis file put into every format's settings (low-rank formats need one; "
                         "with --shape, a random orthonormal one by default)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "serve_check",
                    help="server logs (serve-<n>.log) go here")
    ap.add_argument("--parallel", type=int, default=1,
                    help="servers up at once (each format is its own server); for more than one, give each a "
                         "share of the GPU, e.g. -- --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 2147483648")
    ap.add_argument("extra", nargs="*", help="after --: more `vllm serve` arguments, e.g. -- --enforce-eager")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--max-model-len", str(args.max_model_len), *args.extra]
    basis = args.basis
    if args.shape:
        if args.tokenizer is None:
            ap.error("--shape needs --tokenizer")
        from .shapes import make_basis, make_model

        model = make_model(args.shape, args.tokenizer, args.out / f"model-{args.shape}", vocab_from_tokenizer=True)
        basis = basis or str(make_basis(args.shape, args.out / f"basis-{args.shape}.safetensors"))
        extra = ["--load-format", "dummy", *extra]
    else:
        from .models import smollm2

        model = Path(args.model) if args.model else smollm2()

    def check_format(i: int, fmt: str) -> tuple[list[Reply], list[str]]:
        """Serve one format and check it; a server that does not come up is one failure."""
        settings = json.loads(fmt) if fmt.startswith("{") else {"format": fmt}
        if basis and "basis" not in settings:
            settings["basis"] = basis
        log_path = args.out / f"serve-{i}.log"
        try:
            with vllm_server(model, settings, log_path, served_name="model", extra=extra) as base:
                replies, failures = check_server(base, "model", args.max_tokens)
        except (RuntimeError, TimeoutError, OSError) as e:
            return [], [f"failed to serve: {e}"]
        if "lowrank KV cache formats" not in log_path.read_text():
            failures.append("the server log does not name the lowrank formats")
        return replies, failures

    failed = False
    print(f"{'format':<28} {'endpoint':<18} {'stream':<6} {'cache':<5} {'tokens':>6} {'chunks':>6} {'seconds':>8}  text")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        # results in the order of --formats, each printed as soon as it and those before it are done
        for fmt, (replies, failures) in zip(args.formats, pool.map(check_format, range(len(args.formats)), args.formats)):
            for r in replies:
                print(f"{fmt:<28} {r.endpoint:<18} {str(r.stream):<6} {r.cache:<5} {r.completion_tokens:>6} "
                      f"{r.chunks:>6} {r.seconds:>8.2f}  {r.text[:40]!r}")
            if replies and replies[-1].text != replies[0].text:
                print(f"{fmt:<28} note: the warm repeat (prompt read back from the compressed cache) differs from "
                      f"the cold reply after {len(os.path.commonprefix([replies[0].text, replies[-1].text]))} characters")
            for f in failures:
                print(f"{fmt:<28} FAILED: {f}")
            failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
