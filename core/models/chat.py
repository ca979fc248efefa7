"""Keeping a conversation within what the LLM is given: the system prompt and the newest whole turns."""

from __future__ import annotations

from collections.abc import Sequence

from core.models.base import ChatMessage


def _turns(messages: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """Group messages into turns: each user message with the messages that follow it up to the next one.

    Only the first turn can open with something other than a user message, and it is the first dropped, so
    a cut-down conversation still opens with a user message, as chat templates expect.
    """
    turns: list[list[ChatMessage]] = []
    for message in messages:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def bound_history(messages: Sequence[ChatMessage], max_turns: int, max_chars: int) -> list[ChatMessage]:
    """The leading system message(s) plus the newest turns, at most ``max_turns`` before the newest one.

    A turn is a user message with the replies after it. The newest turn (normally the question being
    answered) is always kept; older turns are kept, newest first, while their count stays within
    ``max_turns`` and the characters of all kept turns within ``max_chars``. Turns are dropped whole, so the
    model never sees a reply without its question; the system prompt is kept and not counted.
    """
    if max_turns < 0 or max_chars < 0:
        raise ValueError(
            f"history bounds must not be negative (max_turns={max_turns}, max_chars={max_chars})"
        )
    start = 0
    while start < len(messages) and messages[start].role == "system":
        start += 1
    system, turns = list(messages[:start]), _turns(messages[start:])
    if not turns:
        return system
    kept = [turns[-1]]
    used = sum(len(m.content) for m in turns[-1])
    for turn in reversed(turns[:-1]):
        size = sum(len(m.content) for m in turn)
        if len(kept) > max_turns or used + size > max_chars:
            break
        kept.append(turn)
        used += size
    return system + [m for turn in reversed(kept) for m in turn]
