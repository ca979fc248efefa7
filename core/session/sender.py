"""The session's output: an outbox of tagged items and the task that sends them, paced near real time.

Two lanes. The *control* lane (speech events, errors, ``response.output_audio.clear``, session events)
is never stale and always goes first. The *response* lane holds one reply's events and Opus packets in
order, each tagged with the generation of the reply; it is bounded in audio packets (the turn waits
when it is full), and an item whose generation is no longer current is dropped, both when the session
purges the outbox on a barge-in and again by the sender right before a send. So once the session has
bumped the generation and queued the clear, no packet of the old reply can follow it on the wire.

Audio is paced: the sender keeps a model of the client's playback (``playhead``: when the client will
have played everything sent) and never lets it run more than ``lead_s`` ahead of now, so that a
barge-in has at most that much audio to take back.

A reply started before the user's turn was confirmed (a preemptive reply) is *held*: its items queue up
in the response lane as usual but none leaves until the session releases its generation. Discarding it is
an ordinary generation bump, so a held reply that is never confirmed sends nothing at all.

The control lane is bounded too, though never dropped from: past ``CONTROL_BACKLOG`` items the session
stops reading the client (:meth:`Outbox.control_room`), so a client that sends bad frames without
reading the answers fills its own socket, not the worker's memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.audio.framing import pack_packets
from core.session.cancel import CancelScope

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]

#: Control items waiting before the session stops reading input (a client that reads sees a handful).
CONTROL_BACKLOG = 256


@dataclass
class ReplyStats:
    """What the sender has sent of one generation."""

    first_audio_at: float | None = None
    packets: int = 0
    audio_s: float = 0.0
    #: How many of the reply's clauses have had their last packet sent (the turn tags those packets).
    clauses_sent: int = 0


#: Builds the text of a ``response.done`` at send time, from the sender's stats and the time of sending.
DoneBuilder = Callable[[ReplyStats, float], str]


@dataclass
class _Item:
    generation: int | None  # None: control lane
    text: str | None = None
    audio: bytes | None = None
    done: DoneBuilder | None = None
    reset_playhead: bool = False
    clause: int | None = None  # this packet ends the clause of that index


class Outbox:
    """Items waiting to be sent (see the module doc)."""

    def __init__(self, scope: CancelScope, capacity_packets: int) -> None:
        self._scope = scope
        self.capacity_packets = capacity_packets
        self._control: collections.deque[_Item] = collections.deque()
        self._reply: collections.deque[_Item] = collections.deque()
        self._audio_count = 0
        self.urgent = asyncio.Event()  # control item, purge or stop: interrupts the pacing wait
        self.available = asyncio.Event()  # anything new
        self._space = asyncio.Event()
        self._space.set()
        self._control_room = asyncio.Event()  # set by pop_control below the backlog; cleared by its waiter
        self._held_generation: int | None = None  # the generation whose items wait for release

    def hold(self, generation: int | None) -> None:
        """Keep every reply item of ``generation`` queued until :meth:`release` (None: hold nothing)."""
        self._held_generation = generation
        self._wake(urgent=True)

    def release(self, generation: int) -> None:
        """Let the held items of ``generation`` go out."""
        if self._held_generation == generation:
            self._held_generation = None
            self._wake(urgent=True)

    @property
    def held(self) -> int | None:
        """The generation being held, if any."""
        return self._held_generation

    def control(self, text: str, *, reset_playhead: bool = False) -> None:
        """Queue a control event (sent before any reply item; never dropped)."""
        self._control.append(_Item(None, text=text, reset_playhead=reset_playhead))
        self._wake(urgent=True)

    async def control_room(self) -> None:
        """Wait while the control lane holds ``CONTROL_BACKLOG`` items (the client is not reading)."""
        while len(self._control) >= CONTROL_BACKLOG:
            self._control_room.clear()
            await self._control_room.wait()

    def put_text(self, generation: int, text: str) -> None:
        """Queue a reply event."""
        if self._scope.is_current(generation):
            self._reply.append(_Item(generation, text=text))
            self._wake()

    def put_done(self, generation: int, build: DoneBuilder) -> None:
        """Queue the reply's ``response.done``, built when it is sent."""
        if self._scope.is_current(generation):
            self._reply.append(_Item(generation, done=build))
            self._wake()

    async def put_audio(self, generation: int, packet: bytes, clause: int | None = None) -> None:
        """Queue an audio packet, waiting while the lane holds ``capacity_packets`` packets.

        ``clause``: the index of the reply clause whose last audio is in this packet, if any.
        """
        while self._audio_count >= self.capacity_packets and self._scope.is_current(generation):
            self._space.clear()
            await self._space.wait()
        if self._scope.is_current(generation):
            self._reply.append(_Item(generation, audio=packet, clause=clause))
            self._audio_count += 1
            self._wake()

    def purge_stale(self) -> int:
        """Drop every reply item whose generation is not current; return how many."""
        before = len(self._reply)
        self._reply = collections.deque(i for i in self._reply if self._is_fresh(i))
        self._audio_count = sum(1 for i in self._reply if i.audio is not None)
        self._space.set()
        self._wake(urgent=True)
        return before - len(self._reply)

    def pop_control(self) -> _Item | None:
        """The next control item, if any."""
        if not self._control:
            return None
        item = self._control.popleft()
        if len(self._control) < CONTROL_BACKLOG:
            self._control_room.set()
        return item

    def pop_reply(self) -> _Item | None:
        """The next reply item, if any (none while the head of the lane is held)."""
        if not self._reply or self._reply[0].generation == self._held_generation:
            return None
        item = self._reply.popleft()
        if item.audio is not None:
            self._audio_count -= 1
            if self._audio_count < self.capacity_packets:
                self._space.set()
        return item

    def pending(self) -> tuple[int, int]:
        """(control items, reply items) waiting."""
        return len(self._control), len(self._reply)

    def is_fresh(self, item: _Item) -> bool:
        """Whether ``item`` may still be sent."""
        return self._is_fresh(item)

    def _is_fresh(self, item: _Item) -> bool:
        return item.generation is None or self._scope.is_current(item.generation)

    def _wake(self, *, urgent: bool = False) -> None:
        self.available.set()
        if urgent:
            self.urgent.set()


class Sender:
    """Sends the outbox over the socket callables; see the module doc for the pacing rule."""

    def __init__(
        self,
        outbox: Outbox,
        send_text: SendText,
        send_bytes: SendBytes,
        clock: Callable[[], float],
        *,
        lead_s: float,
        frame_s: float,
        on_first_audio: Callable[[int, float], None] = lambda gen, t: None,
        on_done: Callable[[int], None] = lambda gen: None,
    ) -> None:
        self._outbox = outbox
        self._send_text = send_text
        self._send_bytes = send_bytes
        self._clock = clock
        self.frame_s = frame_s
        self.lead_s = max(lead_s, frame_s)  # a zero lead would never let the first frame out
        self._on_first_audio = on_first_audio
        self._on_done = on_done
        self._stats: dict[int, ReplyStats] = {}
        self._held: _Item | None = None
        self._stopping = False
        #: When the client will have played all audio sent so far (loop time).
        self.playhead = 0.0

    def stats(self, generation: int) -> ReplyStats:
        """What was sent of ``generation`` so far."""
        return self._stats.setdefault(generation, ReplyStats())

    def take_stats(self, generation: int) -> ReplyStats:
        """What was sent of ``generation``, forgetting it (the reply is over)."""
        return self._stats.pop(generation, ReplyStats())

    def stop(self) -> None:
        """Send what is left in the control lane, then end :meth:`run` (reply items are dropped)."""
        self._stopping = True
        self._outbox.urgent.set()
        self._outbox.available.set()

    async def run(self) -> None:
        """Send until :meth:`stop` (returns) or until the socket fails (raises)."""
        outbox = self._outbox
        while True:
            outbox.urgent.clear()
            outbox.available.clear()
            control = outbox.pop_control()
            if control is not None:
                await self._send_control(control)
                continue
            if self._stopping:
                return
            item = self._held or outbox.pop_reply()
            self._held = None
            if item is None:
                await outbox.available.wait()
            elif outbox.is_fresh(item):
                await self._send_reply(item)

    async def _send_control(self, item: _Item) -> None:
        assert item.text is not None
        if item.reset_playhead:
            self.playhead = self._clock()  # the client dropped its buffered audio
        await self._text(item.text)

    async def _send_reply(self, item: _Item) -> None:
        assert item.generation is not None
        if item.audio is not None:
            delay = self._pacing_delay()
            if delay > 1e-6:
                self._held = item
                await self._wait_urgent(delay)
                return
            await self._audio(item.generation, item.audio, item.clause)
        elif item.done is not None:
            stats = self.take_stats(item.generation)
            text = item.done(stats, self._clock())
            # The reply is over once its response.done is made: a barge-in handled while a slow socket
            # takes that write must not cancel (and report cancelled) a reply already reported completed.
            self._on_done(item.generation)
            await self._text(text)
        elif item.text is not None:
            await self._text(item.text)

    def _pacing_delay(self) -> float:
        """Seconds until one more frame fits in the lead."""
        return self.playhead + self.frame_s - self.lead_s - self._clock()

    async def _wait_urgent(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._outbox.urgent.wait()
        except TimeoutError:
            pass

    async def _audio(self, generation: int, packet: bytes, clause: int | None) -> None:
        now = self._clock()
        # The wire carries [uint16 LE length][packet]; one packet per frame keeps barge-in drops exact.
        await self._send_bytes(pack_packets([packet]))
        self.playhead = max(self.playhead, now) + self.frame_s
        stats = self.stats(generation)
        stats.packets += 1
        stats.audio_s += self.frame_s
        if clause is not None:
            stats.clauses_sent = max(stats.clauses_sent, clause + 1)
        if stats.first_audio_at is None:
            stats.first_audio_at = now
            self._on_first_audio(generation, now)

    async def _text(self, text: str) -> None:
        await self._send_text(text)
