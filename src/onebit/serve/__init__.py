"""`onebit serve`: an OpenAI-compatible server (FastAPI + uvicorn) over the batched engine.

    from onebit.serve import ServeConfig, serve
    serve(ServeConfig(model="packed/demo", port=8000, parallel=8))

Endpoints: /v1/chat/completions, /v1/completions (echo + prompt logprobs), /v1/models, /health,
/metrics (Prometheus), /tokenize, /detokenize, /tokenizer_info (vLLM's: lm-eval's local-completions
tokenizes through it), and a web chat page at /. Needs the ``serve``
extra: ``pip install 'onebit[serve]'``.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServeConfig", "build_app", "serve"]


@dataclass(frozen=True)
class ServeConfig:
    """``model``: a packed folder / HF folder / GGUF file (None: the built-in model);
    ``parallel``: sequences decoded at once (KV cache slots); ``max_queue``: requests waiting for
    a slot before 503; ``ctx``: context per slot (default the model's); ``api_key``: required as
    ``Authorization: Bearer`` on every endpoint but /health."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    parallel: int = 8
    max_queue: int = 64
    ctx: int | None = None
    kv_bits: int | None = None
    prefill_chunk: int = 256
    model_name: str | None = None
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is invalid: use an integer in [0, 65535]")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: pass a non-empty key or none")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes={self.max_body_bytes!r} is invalid: use >= 1024")


def _deps():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(f"onebit serve needs {e.name}: pip install 'onebit[serve]'") from None


def build_app(cfg: ServeConfig):
    """Load the model and build the FastAPI app (its engine starts with the app)."""
    _deps()
    import onebit

    from ..engine import default_model_path
    from .app import create_app

    path = Path(cfg.model) if cfg.model else default_model_path()
    model = onebit.load(path, kv_bits=cfg.kv_bits)
    engine = model.batch(slots=cfg.parallel, max_len=cfg.ctx, prefill_chunk=cfg.prefill_chunk,
                         max_queue=cfg.max_queue)
    name = cfg.model_name or ("onebit-default" if not cfg.model else path.resolve().name)
    return create_app(engine, name, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes), name, engine


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bind(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"--host {host!r} does not resolve ({e}): pass an address such as 127.0.0.1") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port "
                             f"or stop what uses it") from None


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine thread does the work)."""
    _check_bind(cfg.host, cfg.port)
    app, name, engine = build_app(cfg)
    import uvicorn

    if not _loopback(cfg.host) and cfg.api_key is None:
        print(f"onebit serve: warning: listening on {cfg.host} without --api-key: anyone who can "
              f"reach this port can use the model", file=sys.stderr)
    print(f"onebit serve: {name} on http://{cfg.host}:{cfg.port} ({engine.slots} slots x "
          f"{engine.max_len} tokens, KV cache {engine.runtime.kv_bits} bits, "
          f"{engine.runtime.cache_bytes / 2**20:.0f} MiB); chat page at /", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
