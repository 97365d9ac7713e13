"""Fixtures of the server tests: a tiny-random MoCaE and a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from mocae.mixture.model import MoCaEConfig, MoCaEModel

MODEL = "tiny-mocae"


class LoopbackServer:
    """uvicorn in a thread on a free 127.0.0.1 port; stops by itself when the test ends."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.app = app

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def randomise_router(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.fixture
def mocae(expert_dirs, monkeypatch):
    import mocae.mixture.model as model_module

    # A deterministic stand-in for the MiniLM embedding keeps the test fast and offline.
    def fake_embeddings(texts):
        return torch.stack([torch.sin(torch.arange(model_module.EMBEDDING_SIZE) * (1 + len(t) % 7))
                            for t in texts])

    monkeypatch.setattr(model_module, "sentence_embeddings", fake_embeddings)
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs))
    randomise_router(model)
    return model


@pytest.fixture
def serve():
    """serve(model, **ServeConfig fields) -> a LoopbackServer (a context manager) for that model."""
    return _serve


def _serve(model, **cfg):
    from mocae.serve.app import ServeConfig, create_app
    from mocae.serve.batcher import ServedModel

    defaults = dict(max_tokens_cap=64, default_max_tokens=8, max_content_chars=2000, max_prompt_tokens=400)
    return LoopbackServer(create_app(ServedModel(model, model.tokenizer, MODEL), ServeConfig(**{**defaults, **cfg})))




@pytest.fixture
def loopback():
    """The LoopbackServer class: LoopbackServer(app) runs any ASGI app on a free 127.0.0.1 port."""
    return LoopbackServer
