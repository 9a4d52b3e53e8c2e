"""The worker's side of the tokenizer routes: ``Tokenize`` / ``Detokenize`` -> ``TokenizerResult``.

With a generator loaded, :class:`TokenizerHandler` is the engine loop's ``on_message`` hook: each message runs
on the loop thread between two engine steps (one image, bounded by the size policy, so a step waits at most
one encode or decode); the PNG encoding of a decoded image runs on the output thread. A tokenizer-only
worker (``--model`` a lone autoencoder file) runs :func:`run_tokenizer_only` instead of the engine loop.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable

from ..engine.protocol import (
    Cancel,
    Detokenize,
    ErrorCode,
    EventKind,
    Heartbeat,
    RequestEvent,
    Shutdown,
    Submit,
    Tokenize,
    TokenizerResult,
)
from ..tokenize import TokenizeError, encode_png, load_rgb, pack_bits, probe_image, unpack_bits

logger = logging.getLogger(__name__)
NO_GENERATOR = "no_generator"


class TokenizerHandler:
    """``handler(msg)`` -> True when ``msg`` was a tokenizer message: it is queued, and ``tick()`` (once per
    loop iteration) runs one queued message while ``busy()`` (the engine has requests: one encode or decode
    per engine step) or all of them when idle. Answers go through ``submit``, which runs a function on the
    output thread and sends the message it returns."""

    def __init__(self, tokenizer, submit: Callable[[Callable[[], object]], None],
                 busy: Callable[[], bool] = lambda: False):
        self.tok, self.submit, self.busy = tokenizer, submit, busy
        self.pending: deque = deque()

    def __call__(self, msg) -> bool:
        if not isinstance(msg, (Tokenize, Detokenize)):
            return False
        self.pending.append(msg)
        return True

    def tick(self) -> None:
        while self.pending:
            self._run(self.pending.popleft())
            if self.busy():
                return

    def _run(self, msg) -> None:
        try:
            if isinstance(msg, Tokenize):
                self._tokenize(msg)
            else:
                self._detokenize(msg)
        except TokenizeError as e:
            self._fail(msg.request_id, ErrorCode.INVALID.value, str(e), e.field, e.allowed)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the worker down
            logger.exception("tokenizer request %s failed", msg.request_id)
            code = ErrorCode.OUT_OF_MEMORY.value if "out of memory" in str(e).lower() else ErrorCode.INTERNAL.value
            self._fail(msg.request_id, code, f"{type(e).__name__}: {e}")

    def _fail(self, rid: str, code: str, message: str, field: str | None = None, allowed=None) -> None:
        err = {"code": code, "message": message}
        if field is not None:
            err.update(field=field, allowed=allowed)
        self.submit(lambda: TokenizerResult(rid, error=err))

    def _tokenize(self, msg: Tokenize) -> None:
        spec = self.tok.spec
        ps = spec.check_patch_size(msg.patch_size)
        spec.check_size(msg.height, msg.width, "size", ps)
        probe_image(msg.image)
        tokens = self.tok.tokenize(load_rgb(msg.image, msg.height, msg.width, msg.resize), ps)
        data = {"tokens": pack_bits(tokens), "token_shape": list(tokens.shape), "height": msg.height,
                "width": msg.width, "patch_size": ps}
        self.submit(lambda: TokenizerResult(msg.request_id, data))

    def _detokenize(self, msg: Detokenize) -> None:
        spec = self.tok.spec
        ps = spec.check_patch_size(msg.patch_size)
        spec.check_size(msg.height, msg.width, "size", ps)
        n, c = spec.check_tokens(msg.tokens, list(msg.token_shape), msg.height, msg.width)
        image = self.tok.detokenize(unpack_bits(msg.tokens, n, c), msg.height, msg.width, ps)
        self.submit(lambda: TokenizerResult(msg.request_id, {"image": encode_png(image), "format": "png",
                                                              "height": msg.height, "width": msg.width}))


def run_tokenizer_only(handler: TokenizerHandler, inbox, send: Callable[[object], None], worker_index: int,
                       beat_s: float = 2.0) -> None:
    """The loop of a worker without a generator: tokenizer messages, heartbeats; a generation request is
    answered ``no_generator``; returns on ``Shutdown`` (nothing to drain) or a closed inbox."""
    last = 0.0
    while True:
        try:
            msg = inbox.get(timeout=beat_s / 2)
        except queue.Empty:
            msg = False
        if msg is None or isinstance(msg, Shutdown):
            return
        if isinstance(msg, Submit):
            send(RequestEvent(msg.request.request_id, EventKind.FAILED, {
                "code": NO_GENERATOR, "message": "this server loads an autoencoder only (a tokenizer service): "
                "generation is not available; use POST /v1/tokenize and /v1/detokenize"}))
        elif msg is not False and not isinstance(msg, Cancel) and not handler(msg):
            logger.warning("tokenizer worker: unknown message %r", type(msg).__name__)
        handler.tick()
        now = time.monotonic()
        if now - last >= beat_s:
            last = now
            send(Heartbeat(worker_index, False, 0, 0, 0, 0))
