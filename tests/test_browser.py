"""The demo page in real Chromium (Debian's ``chromium`` driven by playwright-core), served over HTTPS by
the real gateway (``gateway.py``, self-signed certificate, an API key), which the page reaches with
``?api_key=`` from its URL.

Chromium's fake microphone plays an espeak recording of "What is the capital of France?" followed by
silence, on a loop. The conversation, queue and barge-in tests run against two workers behind it:

- ``real``: a real worker on the embedded models (``worker.py --stack embedded``): the real transcript
  and reply, played (skipped while the worker's modules are not all written yet);
- ``standin``: ``tests/browser/standin_server.py`` (scripted replies, real Opus both ways, reply packets
  split across frames), which also covers what the real stack cannot be made to do on demand: a browser
  without WebCodecs, a refused microphone, a wrong API key, a second voice.

Each scenario runs ``node tests/browser/drive.mjs SCENARIO URL MIC OUT`` and checks the JSON it prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile as sf
import soxr

from tests.speech import espeak, with_silence

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
DRIVER = ROOT / "tests" / "browser" / "drive.mjs"
QUESTION = "What is the capital of France?"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"chromium not installed at {CHROMIUM} (install.sh)"
    ),
    pytest.mark.skipif(
        shutil.which("node") is None or not (ROOT / "node_modules" / "playwright-core").is_dir(),
        reason="node or node_modules/playwright-core missing (run install.sh, or npm install)",
    ),
]


API_KEY = "sesame"
# Written by other engineers in parallel; the real-worker tests skip (with this list) while any is missing.
REAL_WORKER_FILES = (
    "worker.py",
    "core/worker/app.py",
    "core/session/duplex.py",
    "core/models/registry.py",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A server subprocess with its output in a log file (shown when it fails to come up)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.url = ""
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_healthy(self, url: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float) -> None:
        """Poll ``url`` until it answers 200 with a body ``ok`` accepts; fail with the log if it never does."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(verify=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"{self.proc.args} exited with {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = client.get(url)
                    body = r.json()
                    if r.status_code == 200 and ok(body):
                        return
                    if body.get("status") == "error":  # e.g. a worker whose models failed to load
                        pytest.fail(f"{url} reports an error: {body}\n{self.tail()}")
                time.sleep(0.2)
        pytest.fail(f"{url} not healthy after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def mic_wav(work_dir: Path) -> Path:
    """The fake microphone: a pause (time to connect), the question, then silence.

    Chromium loops the file, so the silence is long: a repeat of the question while the worker is still
    transcribing on a busy CPU would barge in and cancel that turn. espeak's British voice, because
    Whisper base hears its en-us "of France" as "of friends" more often than not.
    """
    audio = with_silence(espeak(QUESTION, voice="en"), before_s=1.5, after_s=60.0)
    path = work_dir / "question.wav"
    sf.write(path, soxr.resample(audio, 16_000, 48_000), 48_000, subtype="PCM_16")
    return path


def drive(scenario: str, url: str, mic: Path, out_dir: Path, step_s: float = 60) -> dict[str, Any]:
    """Run one driver scenario in a fresh Chromium; return what the page showed.

    ``step_s`` bounds each wait in the scenario (for the page to be live, for a reply, ...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["node", str(DRIVER), scenario, url, str(mic), str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3 * step_s + 60,
        check=False,
        env={**os.environ, "BROWSER_STEP_TIMEOUT_MS": str(int(step_s * 1000))},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": "no result"}
    if proc.returncode != 0 or "error" in result:
        pytest.fail(
            f"browser scenario {scenario!r} failed: {json.dumps(result, indent=1)}\n{proc.stderr[-2000:]}"
        )
    return result


# --------------------------------------------------------------------------- servers


def _start_gateway(worker_port: int, log: Path) -> Process:
    """The real gateway on a free port in front of one worker, wanting ``API_KEY``; waits until it has
    seen the worker healthy."""
    port = _free_port()
    gateway = Process(
        [
            sys.executable,
            "gateway.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            f"127.0.0.1:{worker_port}",
        ],
        log,
        env={"DUPLEX_API_KEY": API_KEY},
    )
    gateway.url = f"https://127.0.0.1:{port}/"
    gateway.wait_healthy(gateway.url + "health", lambda b: b.get("status") == "ok", 60)
    return gateway


@pytest.fixture(scope="module")
def real_url(work_dir: Path) -> Iterator[str]:
    """Page URL on the real gateway in front of one real worker on the embedded models."""
    missing = [name for name in REAL_WORKER_FILES if not (ROOT / name).exists()]
    if missing:
        pytest.skip(f"real worker not runnable yet ({', '.join(missing)} missing)")
    port = _free_port()
    worker = Process(
        [sys.executable, "worker.py", "--worker-index", "0", "--port", str(port), "--stack", "embedded"],
        work_dir / "worker.log",
    )
    gateway: Process | None = None
    try:
        worker.wait_healthy(f"http://127.0.0.1:{port}/health", lambda b: b.get("status") == "idle", 240)
        gateway = _start_gateway(port, work_dir / "gateway_real.log")
        yield gateway.url + f"?api_key={API_KEY}"
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


@pytest.fixture(scope="module")
def standin(work_dir: Path) -> Iterator[tuple[str, str]]:
    """(page URL on the real gateway, stand-in worker URL) with the stand-in as the one worker."""
    port = _free_port()
    worker = Process(
        [sys.executable, "tests/browser/standin_server.py", "--port", str(port)], work_dir / "standin.log"
    )
    gateway: Process | None = None
    try:
        worker_url = f"http://127.0.0.1:{port}/"
        worker.wait_healthy(worker_url + "health", lambda b: b.get("status") == "idle", 60)
        gateway = _start_gateway(port, work_dir / "gateway_standin.log")
        yield gateway.url + f"?api_key={API_KEY}", worker_url
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def _standin_stats(worker_url: str) -> dict[str, Any]:
    """What the stand-in worker received so far."""
    body: dict[str, Any] = httpx.get(worker_url + "standin/stats").json()
    return body


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.slow), "standin"])
def server(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(kind, page URL) for each worker kind."""
    if request.param == "real":
        return "real", request.getfixturevalue("real_url")
    return "standin", request.getfixturevalue("standin")[0]


# --------------------------------------------------------------------------- both workers


def test_browser_conversation(server: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """Ask a question through the page: its transcript, a reply, reply audio played; then hang up."""
    kind, url = server
    shots = ROOT / "tmp" if kind == "real" else work_dir / "standin"
    # The real models on a shared 2-core CPU can take many seconds per stage; the stand-in answers at once.
    page = drive("conversation", url, mic_wav, shots, step_s=150 if kind == "real" else 30)
    assert any("capital" in u.lower() and "france" in u.lower() for u in page["users"]), page["users"]
    assert any(r.strip() for r in page["replies"]), page["replies"]
    # The stage timings show the end-of-turn decision: the turn model's (semantic_vad, the default) or silence.
    assert any(
        "end of turn" in t and ("(turn model, p " in t or "(silence)" in t) for t in page["timings"]
    ), page
    if kind == "standin":
        assert "end of turn 230 ms (turn model, p 0.91)" in page["timings"][0], page["timings"]
    stats = page["stats"]
    assert stats["inputFormat"] == "opus" and stats["packetsSent"] > 0, stats
    assert stats["packetsDecoded"] > 0 and stats["samplesPlayed"] > 0, stats
    assert stats["framingErrors"] == 0, stats
    # Every 20 ms packet became 20 ms of audio at the playback rate (not e.g. 48 kHz samples played at 24).
    queued_s, decoded_s = stats["samplesQueued"] / stats["playbackRate"], stats["packetsDecoded"] * 0.02
    assert abs(queued_s - decoded_s) <= 0.01 * decoded_s + 0.005, stats
    assert page["focus"]["id"] == "start" and page["focus"]["focusVisible"], page["focus"]
    assert page["voiceShown"] == (page["voiceOptions"] > 1), page  # a choice only where there is one
    assert page["afterHangup"].startswith("Call ended"), page["afterHangup"]
    assert (shots / "browser_demo.png").stat().st_size > 10_000


def test_browser_queue(server: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """One worker, two pages: the second waits at position 1 with a falling countdown, then connects."""
    kind, url = server
    result = drive("queue", url, mic_wav, work_dir / f"queue_{kind}")
    before, after = result["before"], result["after"]
    assert before["stats"]["queuePosition"] == 1, before
    assert "next in line" in before["queue"], before["queue"]
    assert after["stats"]["etaSeconds"] < before["stats"]["etaSeconds"], (before["stats"], after["stats"])
    assert result["firstAfterHangup"].startswith("Call ended"), result["firstAfterHangup"]
    assert result["secondLive"]["stats"]["state"] == "live", result["secondLive"]


def test_browser_barge_in_empties_playback(server: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """Stopping a reply while it plays: the page's playback buffer is empty within 100 ms of the clear."""
    kind, url = server
    stats = drive(
        "bargein", url, mic_wav, work_dir / f"bargein_{kind}", step_s=150 if kind == "real" else 30
    )["stats"]
    assert stats["clears"] >= 1, stats
    assert stats["bufferedAtLastClear"] > 0, stats  # there was audio to throw away
    assert stats["bufferedSamples"] == 0, stats
    assert 0 <= stats["lastClearToEmptyMs"] < 100, stats


# --------------------------------------------------------------------------- the stand-in only


def test_browser_voice_choice_and_pause(standin: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """Two voices on offer: the choice shows and reaches the server; Pause and Resume round-trip."""
    url, worker = standin
    before = len(_standin_stats(worker)["voices"])
    page = drive("controls", url, mic_wav, work_dir / "controls")
    assert page["voiceShown"] is True
    assert _standin_stats(worker)["voices"][before:] == [page["choice"]] == ["joe"]
    assert page["paused"]["button"] == ["Resume", "true"], page["paused"]
    assert "not listening" in page["paused"]["activity"]
    assert page["resumed"]["button"] == ["Pause", "false"], page["resumed"]


def test_browser_without_webcodecs_sends_pcm16(
    standin: tuple[str, str], mic_wav: Path, work_dir: Path
) -> None:
    """No AudioEncoder/AudioDecoder: the page says so, declares pcm16, and its raw audio is understood."""
    url, worker = standin
    before = _standin_stats(worker)
    page = drive("nocodecs", url, mic_wav, work_dir / "nocodecs")
    assert "AudioEncoder" in page["message"] and "playback is unavailable" in page["message"], page["message"]
    assert page["stats"]["inputFormat"] == "pcm16" and page["stats"]["packetsDecoded"] == 0, page["stats"]
    assert page["replies"], page
    after = _standin_stats(worker)
    assert after["formats"][len(before["formats"]) :] == ["pcm16"]
    assert after["utterances"] > before["utterances"]  # the question was found in the pcm16 stream


def test_browser_microphone_refused(standin: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """A refused microphone gives a message saying what to do, and no connection is made."""
    url, worker = standin
    before = _standin_stats(worker)["sessions"]
    page = drive("micdenied", url, mic_wav, work_dir / "micdenied")
    assert "Microphone access was refused" in page["message"], page["message"]
    assert page["stats"]["state"] == "error"
    assert _standin_stats(worker)["sessions"] == before


def test_browser_wrong_api_key(standin: tuple[str, str], mic_wav: Path, work_dir: Path) -> None:
    """The gateway refuses a wrong ?api_key=, and the page says where to enter the right one."""
    url, worker = standin
    before = _standin_stats(worker)["sessions"]
    page = drive("badkey", url.replace(API_KEY, "wrong"), mic_wav, work_dir / "badkey")
    assert "API key" in page["message"], page["message"]
    assert page["stats"]["state"] == "error"
    assert _standin_stats(worker)["sessions"] == before
