"""The session's turn-taking state machine: a pure ``step(state, event) -> Transition``.

The session feeds every happening (VAD decisions, client control events, the sender's progress, timers)
through :func:`step` and carries out the returned actions in order. Every (state, event) pair has an
outcome: a pair that makes no sense (a commit while the assistant speaks, anything after close) is a
no-op, never an exception, so a misbehaving client cannot drive the session into an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    """Where the conversation is."""

    LISTENING = "listening"  # nobody speaks; waiting for the user
    USER_SPEAKING = "user_speaking"  # VAD confirmed user speech; waiting for the end of the turn
    THINKING = "thinking"  # a turn runs (ASR, LLM, TTS) and no reply audio has been sent yet
    SPEAKING = "speaking"  # reply audio is going out
    PAUSED = "paused"  # input ignored, output stopped, until resume or the pause timeout
    CLOSED = "closed"  # final


class Event(StrEnum):
    """Something that happened."""

    SPEECH_START = "speech_start"  # user speech lasted duplex.min_speech_ms
    SPEECH_END = "speech_end"  # end of turn: the silence limit, or the turn model's confident judgement
    # A short silence after speech (duplex.pause_check_ms) and speech again after it. Not transitions:
    # the session asks the turn model and starts or drops a preemptive reply on them.
    SPEECH_PAUSE = "speech_pause"
    SPEECH_RESUME = "speech_resume"
    BARGE_IN = "barge_in"  # user speech lasted duplex.barge_in_min_speech_ms
    COMMIT = "commit"  # client: input_audio_buffer.commit
    RESPONSE_STARTED = "response_started"  # the first reply audio packet was sent
    RESPONSE_DONE = "response_done"  # response.done was sent, or the turn ended without a response
    CANCEL = "cancel"  # client: response.cancel
    PAUSE = "pause"
    RESUME = "resume"
    PAUSE_TIMEOUT = "pause_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    CLOSE = "close"  # client close, disconnect or server shutdown


class Action(StrEnum):
    """What the session must do, in the order given."""

    EMIT_SPEECH_STARTED = "emit_speech_started"
    EMIT_SPEECH_STOPPED = "emit_speech_stopped"
    START_TURN = "start_turn"  # take the utterance and start a reply
    CANCEL_TURN = "cancel_turn"  # bump the generation, cancel the turn task, drop queued output
    CLEAR_AUDIO = "clear_audio"  # send response.output_audio.clear and response.done(cancelled)
    DROP_UTTERANCE = "drop_utterance"  # forget the user speech in progress
    EMIT_PAUSED = "emit_paused"
    EMIT_RESUMED = "emit_resumed"
    START_PAUSE_TIMER = "start_pause_timer"
    STOP_PAUSE_TIMER = "stop_pause_timer"
    CLOSE = "close"  # send session.closed and stop every task


@dataclass(frozen=True)
class Transition:
    """The outcome of one event: the next state and the actions to carry out."""

    state: State
    actions: tuple[Action, ...] = ()


A = Action
_INTERRUPT = (A.CANCEL_TURN, A.CLEAR_AUDIO)
_PAUSE = (A.EMIT_PAUSED, A.START_PAUSE_TIMER)
_END_OF_TURN = (A.EMIT_SPEECH_STOPPED, A.START_TURN)

_TABLE: dict[tuple[State, Event], Transition] = {
    # listening
    (State.LISTENING, Event.SPEECH_START): Transition(State.USER_SPEAKING, (A.EMIT_SPEECH_STARTED,)),
    (State.LISTENING, Event.COMMIT): Transition(State.THINKING, _END_OF_TURN),
    (State.LISTENING, Event.PAUSE): Transition(State.PAUSED, _PAUSE),
    (State.LISTENING, Event.IDLE_TIMEOUT): Transition(State.CLOSED, (A.CLOSE,)),
    # the user speaks
    (State.USER_SPEAKING, Event.SPEECH_END): Transition(State.THINKING, _END_OF_TURN),
    (State.USER_SPEAKING, Event.COMMIT): Transition(State.THINKING, _END_OF_TURN),
    (State.USER_SPEAKING, Event.PAUSE): Transition(State.PAUSED, (A.DROP_UTTERANCE, *_PAUSE)),
    # a reply is being prepared
    (State.THINKING, Event.RESPONSE_STARTED): Transition(State.SPEAKING),
    (State.THINKING, Event.RESPONSE_DONE): Transition(State.LISTENING),
    (State.THINKING, Event.BARGE_IN): Transition(State.USER_SPEAKING, (*_INTERRUPT, A.EMIT_SPEECH_STARTED)),
    (State.THINKING, Event.CANCEL): Transition(State.LISTENING, _INTERRUPT),
    (State.THINKING, Event.PAUSE): Transition(State.PAUSED, (*_INTERRUPT, A.DROP_UTTERANCE, *_PAUSE)),
    # the assistant speaks
    (State.SPEAKING, Event.RESPONSE_DONE): Transition(State.LISTENING),
    (State.SPEAKING, Event.BARGE_IN): Transition(State.USER_SPEAKING, (*_INTERRUPT, A.EMIT_SPEECH_STARTED)),
    (State.SPEAKING, Event.CANCEL): Transition(State.LISTENING, _INTERRUPT),
    (State.SPEAKING, Event.PAUSE): Transition(State.PAUSED, (*_INTERRUPT, A.DROP_UTTERANCE, *_PAUSE)),
    # paused
    (State.PAUSED, Event.RESUME): Transition(State.LISTENING, (A.STOP_PAUSE_TIMER, A.EMIT_RESUMED)),
    (State.PAUSED, Event.PAUSE_TIMEOUT): Transition(State.CLOSED, (A.CLOSE,)),
}


def step(state: State, event: Event) -> Transition:
    """The transition for ``event`` in ``state``; an event that does not apply keeps the state, no actions."""
    if state is State.CLOSED:
        return Transition(State.CLOSED)
    if event is Event.CLOSE:
        if state in (State.THINKING, State.SPEAKING):
            return Transition(State.CLOSED, (*_INTERRUPT, A.CLOSE))
        return Transition(State.CLOSED, (A.CLOSE,))
    return _TABLE.get((state, event), Transition(state))
