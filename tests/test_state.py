"""The turn-taking state machine, table-tested: every (state, event) pair has a defined outcome."""

from __future__ import annotations

import itertools

import pytest

from core.session.state import Action, Event, State, Transition, step

S, E, A = State, Event, Action
INTERRUPT = (A.CANCEL_TURN, A.CLEAR_AUDIO)
PAUSE = (A.EMIT_PAUSED, A.START_PAUSE_TIMER)
END_OF_TURN = (A.EMIT_SPEECH_STOPPED, A.START_TURN)

# Everything that is not a no-op, written out independently of the implementation's table.
EXPECTED: dict[tuple[State, Event], Transition] = {
    (S.LISTENING, E.SPEECH_START): Transition(S.USER_SPEAKING, (A.EMIT_SPEECH_STARTED,)),
    (S.LISTENING, E.COMMIT): Transition(S.THINKING, END_OF_TURN),
    (S.LISTENING, E.PAUSE): Transition(S.PAUSED, PAUSE),
    (S.LISTENING, E.IDLE_TIMEOUT): Transition(S.CLOSED, (A.CLOSE,)),
    (S.LISTENING, E.CLOSE): Transition(S.CLOSED, (A.CLOSE,)),
    (S.USER_SPEAKING, E.SPEECH_END): Transition(S.THINKING, END_OF_TURN),
    (S.USER_SPEAKING, E.COMMIT): Transition(S.THINKING, END_OF_TURN),
    (S.USER_SPEAKING, E.PAUSE): Transition(S.PAUSED, (A.DROP_UTTERANCE, *PAUSE)),
    (S.USER_SPEAKING, E.CLOSE): Transition(S.CLOSED, (A.CLOSE,)),
    (S.THINKING, E.RESPONSE_STARTED): Transition(S.SPEAKING),
    (S.THINKING, E.RESPONSE_DONE): Transition(S.LISTENING),
    (S.THINKING, E.BARGE_IN): Transition(S.USER_SPEAKING, (*INTERRUPT, A.EMIT_SPEECH_STARTED)),
    (S.THINKING, E.CANCEL): Transition(S.LISTENING, INTERRUPT),
    (S.THINKING, E.PAUSE): Transition(S.PAUSED, (*INTERRUPT, A.DROP_UTTERANCE, *PAUSE)),
    (S.THINKING, E.CLOSE): Transition(S.CLOSED, (*INTERRUPT, A.CLOSE)),
    (S.SPEAKING, E.RESPONSE_DONE): Transition(S.LISTENING),
    (S.SPEAKING, E.BARGE_IN): Transition(S.USER_SPEAKING, (*INTERRUPT, A.EMIT_SPEECH_STARTED)),
    (S.SPEAKING, E.CANCEL): Transition(S.LISTENING, INTERRUPT),
    (S.SPEAKING, E.PAUSE): Transition(S.PAUSED, (*INTERRUPT, A.DROP_UTTERANCE, *PAUSE)),
    (S.SPEAKING, E.CLOSE): Transition(S.CLOSED, (*INTERRUPT, A.CLOSE)),
    (S.PAUSED, E.RESUME): Transition(S.LISTENING, (A.STOP_PAUSE_TIMER, A.EMIT_RESUMED)),
    (S.PAUSED, E.PAUSE_TIMEOUT): Transition(S.CLOSED, (A.CLOSE,)),
    (S.PAUSED, E.CLOSE): Transition(S.CLOSED, (A.CLOSE,)),
}
ALL_PAIRS = list(itertools.product(State, Event))


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s.value}-{e.value}" for s, e in ALL_PAIRS])
def test_every_pair_has_the_expected_outcome(state: State, event: Event) -> None:
    expected = EXPECTED.get((state, event), Transition(state))  # anything else: a no-op
    assert step(state, event) == expected


def test_the_table_covers_the_documented_no_ops() -> None:
    # A few pairs a misbehaving client or a late callback can produce, that must change nothing.
    for state, event in [
        (S.SPEAKING, E.COMMIT),  # commit while the assistant talks
        (S.THINKING, E.SPEECH_START),  # speech below the barge-in threshold
        (S.SPEAKING, E.SPEECH_END),
        (S.LISTENING, E.RESPONSE_DONE),  # a stale callback after a cancel
        (S.LISTENING, E.CANCEL),  # nothing to cancel
        (S.LISTENING, E.BARGE_IN),  # barge-in threshold below min speech: the start comes separately
        (S.USER_SPEAKING, E.BARGE_IN),
        (S.PAUSED, E.SPEECH_START),  # input ignored while paused
        (S.PAUSED, E.PAUSE),
        (S.LISTENING, E.RESUME),
        (S.SPEAKING, E.IDLE_TIMEOUT),
    ]:
        assert step(state, event) == Transition(state)


def test_closed_is_final() -> None:
    for event in Event:
        assert step(S.CLOSED, event) == Transition(S.CLOSED)


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s.value}-{e.value}" for s, e in ALL_PAIRS])
def test_invariants(state: State, event: Event) -> None:
    t = step(state, event)
    # A reply in progress is never abandoned without cancelling it (done/started are its own ends).
    abandons = state in (S.THINKING, S.SPEAKING) and t.state not in (S.THINKING, S.SPEAKING)
    if abandons and event is not E.RESPONSE_DONE:
        assert t.actions[:2] == INTERRUPT
    assert (A.START_TURN in t.actions) == (t.state is S.THINKING and state is not S.THINKING)
    assert (A.EMIT_PAUSED in t.actions) == (t.state is S.PAUSED and state is not S.PAUSED)
    assert (A.CLOSE in t.actions) == (t.state is S.CLOSED and state is not S.CLOSED)
    assert len(set(t.actions)) == len(t.actions)


def test_a_conversation_with_a_barge_in() -> None:
    state, seen = S.LISTENING, []
    script = [
        E.SPEECH_START, E.SPEECH_END, E.RESPONSE_STARTED, E.BARGE_IN, E.SPEECH_END,
        E.RESPONSE_STARTED, E.RESPONSE_DONE, E.CLOSE,
    ]  # fmt: skip
    for event in script:
        state = step(state, event).state
        seen.append(state)
    assert seen == [
        S.USER_SPEAKING, S.THINKING, S.SPEAKING, S.USER_SPEAKING, S.THINKING,
        S.SPEAKING, S.LISTENING, S.CLOSED,
    ]  # fmt: skip
