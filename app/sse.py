"""Reading a Server-Sent Events stream (`GET /jobs/{id}/stream`) line by line, for clients of the
API (the benchmarks, the tests, a command-line follower): the parts of the format's parsing rules
(HTML Living Standard, "event stream interpretation") the service's streams use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Message:
    """One dispatched message (`event` is "message" when unnamed), or a comment (`comment` set)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    comment: str | None = None
    _lines: list[str] = field(default_factory=list, repr=False)

    def json(self) -> Any:
        return json.loads(self.data)


class Parser:
    """Feed it lines (without their line ending); it returns a message at each blank line."""

    def __init__(self) -> None:
        self._current = Message()
        self._has_fields = False

    def line(self, line: str) -> Message | None:
        if not line:
            if not self._has_fields:
                return None
            message, self._current, self._has_fields = self._current, Message(), False
            message.data = "\n".join(message._lines)
            return message
        if line.startswith(":"):
            return Message(event="", comment=line[1:].lstrip(" "))
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._current.event = value
        elif name == "data":
            self._current._lines.append(value)
        elif name == "id":
            self._current.id = value
        else:
            return None  # retry, or an unknown field: ignored as the standard says
        self._has_fields = True
        return None


def messages(lines: Iterable[str]) -> Iterator[Message]:
    """Messages and comments from the lines of a stream."""
    parser = Parser()
    for line in lines:
        message = parser.line(line.rstrip("\r\n"))
        if message is not None:
            yield message


async def amessages(lines: AsyncIterable[str]) -> AsyncIterator[Message]:
    """`messages` for an asynchronous source of lines (httpx's `aiter_lines`)."""
    parser = Parser()
    async for line in lines:
        message = parser.line(line.rstrip("\r\n"))
        if message is not None:
            yield message
