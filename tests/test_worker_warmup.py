"""The worker warms its models up on the thread that serves them (CUDA graphs captured in warm-up are tied to
the capturing thread; warming up elsewhere would record them again on the first real turn)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from fastapi.testclient import TestClient

from core.config import Config, ServiceConfig
from core.models.base import ModelStack
from core.models.fake import FakeLLM, build_fake_stack
from core.worker.app import create_app
from tests.services import WORKER_HEADERS, WORKER_SECRET


class ThreadRecordingLLM(FakeLLM):
    """A scripted LLM that notes which thread warmed it up and which one served each reply."""

    def __init__(self) -> None:
        super().__init__("Hello there.")
        self.warmed_on: list[str] = []
        self.served_on: list[str] = []

    def warmup(self) -> None:
        self.warmed_on.append(threading.current_thread().name)
        super().warmup()

    def stream(self, *args: object, **kwargs: object) -> Iterator[str]:  # type: ignore[override]
        self.served_on.append(threading.current_thread().name)
        return super().stream(*args, **kwargs)  # type: ignore[arg-type]


def test_models_warm_up_on_the_thread_that_serves_them() -> None:
    llm = ThreadRecordingLLM()
    fake = build_fake_stack()
    stack = ModelStack(
        asr=fake.asr,
        llm=llm,
        tts=fake.tts,
        vad_factory=fake.vad_factory,
        kind="fake",
        device="cpu",
        info=fake.info,
    )
    app = create_app(Config(service=ServiceConfig(worker_secret=WORKER_SECRET)), lambda: stack)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.05)
        reply = client.post("/v1/chat", json={"text": "Hi!"}, headers=WORKER_HEADERS)
        assert reply.status_code == 200, reply.text
    assert len(llm.warmed_on) == 1 and llm.served_on
    assert llm.warmed_on[0] != "model-load"  # not the loading thread
    assert set(llm.served_on) == {llm.warmed_on[0]}
