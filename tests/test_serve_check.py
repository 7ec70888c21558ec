"""The ``vllm serve`` check itself: against a stub OpenAI server it passes good replies and reports bad ones."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_lowrank.serve_check import check_server


def _stub(tokens: int, stream_text: str | None = None, bodies: list | None = None) -> ThreadingHTTPServer:
    """Replies "a b c d" with ``tokens`` completion tokens; streams ``stream_text`` (default the same);
    keeps the request bodies in ``bodies``."""
    text = "a b c d"
    bodies = [] if bodies is None else bodies
    streamed = text if stream_text is None else stream_text

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            chat = self.path.endswith("chat/completions")
            self.send_response(200)
            if not body.get("stream"):
                choice = {"message": {"content": text}} if chat else {"text": text}
                out = json.dumps({"choices": [choice], "usage": {"completion_tokens": tokens}}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                return
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            words = streamed.split(" ")
            for piece in [words[0], *(" " + w for w in words[1:])]:
                choice = {"delta": {"content": piece}} if chat else {"text": piece}
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': tokens}})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("tokens,stream_text,expected", [
    (8, None, []),
    (7, None, ["7 tokens, asked 8"] * 5),
    (8, "a b x d", ["streamed text differs"] * 2),
])
def test_check_server_verdicts(tokens, stream_text, expected):
    bodies = []
    server = _stub(tokens, stream_text, bodies)
    try:
        replies, failures = check_server(f"http://127.0.0.1:{server.server_address[1]}", "m", max_tokens=8)
    finally:
        server.shutdown()
    assert len(replies) == 5 and all(r.text for r in replies)
    assert [r.cache for r in replies] == ["cold"] * 4 + ["warm"]
    # four cold prompts (distinct prefix-cache salts), then the first one again; special tokens kept
    salts = [b["cache_salt"] for b in bodies]
    assert len(set(salts[:4])) == 4 and salts[4] == salts[0]
    assert all(b["skip_special_tokens"] is False and b["temperature"] == 0 for b in bodies)
    assert len(failures) == len(expected) and all(e in f for e, f in zip(expected, failures)), failures


def test_dummy_shape_vocabulary_follows_the_tokenizer_for_text_checks(tmp_path):
    """Random weights over the 8B shape's 128256 ids mostly pick ids a borrowed tokenizer lacks (empty text):
    the serve check sizes the vocabulary to the tokenizer; the throughput benchmark keeps the shape's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from vllm_lowrank.shapes import SHAPES, make_model

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(WordLevel({w: i for i, w in enumerate(["<unk>", "a", "b", "c", "d"])}, unk_token="<unk>")).save(
        str(tok_dir / "tokenizer.json"))
    text = json.loads((make_model("8b", tok_dir, tmp_path / "m1", vocab_from_tokenizer=True) / "config.json").read_text())
    timed = json.loads((make_model("8b", tok_dir, tmp_path / "m2") / "config.json").read_text())
    assert text["vocab_size"] == 5
    assert timed["vocab_size"] == SHAPES["8b"]["vocab_size"] == 128256
    assert text["hidden_size"] == timed["hidden_size"] == 4096
