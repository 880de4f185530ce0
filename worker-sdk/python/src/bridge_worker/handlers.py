"""What handlers return and how the SDK calls them.

A request handler is called as ``handler(ctx, data)`` and may be:

- an ``async def``: its return value is the final reply;
- an ``async def`` with ``yield`` (async generator): every yielded value is a
  partial reply, a yielded :class:`Reply` is the final one (the generator is
  closed right after it), and a generator that ends without yielding a
  :class:`Reply` gets a final reply with ``null`` data;
- a plain ``def``: run in the worker's thread pool, so blocking calls (a model,
  a database driver) do not stall the event loop; its return value is the
  final reply;
- a plain ``def`` with ``yield``: the same as an async generator, each step
  run in the thread pool.

Return or yield :class:`Reply` / :class:`Partial` to give a reply its own
message type (e.g. ``THOUGHT``); any other value is the reply's ``data`` with
the request's type. Raise :class:`~bridge_worker.HandlerError` to fail.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .protocol import Json

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True, slots=True)
class Reply:
    """The final (``done: true``) reply of a request.

    Return it from a handler (or yield it from a generator handler) to name
    the reply's message type; returning a bare value is the same as
    ``Reply(value)``.
    """

    data: Json = None
    msg_type: str | None = None
    """Message type the client sees; ``None`` means the request's own type."""


@dataclass(frozen=True, slots=True)
class Partial:
    """A partial (``done: false``) reply with its own message type.

    Yield it from a generator handler (yielding a bare value is the same as
    ``Partial(value)``), or pass the same to :meth:`Context.send_partial`.
    """

    data: Json = None
    msg_type: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """A WebSocket frame of a raw route, passed unchanged in both directions."""

    binary: bool
    """``True`` for a binary frame, ``False`` for a text frame."""
    payload: bytes
    """The frame's payload (UTF-8 for a text frame)."""

    @classmethod
    def from_text(cls, text: str) -> Frame:
        """A text frame."""
        return cls(False, text.encode("utf-8"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Frame:
        """A binary frame."""
        return cls(True, bytes(data))

    def as_text(self) -> str | None:
        """The payload as text, for a text frame that is valid UTF-8."""
        if self.binary:
            return None
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None


class Style(enum.Enum):
    """How a handler function is called."""

    ASYNC = "async"
    ASYNC_GEN = "async generator"
    SYNC = "sync"
    SYNC_GEN = "sync generator"


def style_of(fn: Callable[..., Any]) -> Style:
    """Classifies a handler once, at registration."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = target.__call__  # a callable object: look at its __call__
    if inspect.isasyncgenfunction(target):
        return Style.ASYNC_GEN
    if inspect.iscoroutinefunction(target):
        return Style.ASYNC
    if inspect.isgeneratorfunction(target):
        return Style.SYNC_GEN
    return Style.SYNC


def in_thread(executor: Executor, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Runs ``fn(*args)`` in ``executor`` with the caller's context variables."""
    ctx = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(executor, functools.partial(ctx.run, fn, *args))


def as_final(value: Any) -> Reply:
    """A handler's return value as the final reply."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, Partial):
        raise TypeError("a handler returned a Partial; return a Reply (or a bare value) as the final reply")
    return Reply(value)


_END = object()


async def run_request(fn: Callable[..., Any], style: Style, ctx: Context, data: Json, executor: Executor) -> Reply:
    """Calls a request handler in its style and returns its final reply.

    Partial replies are sent through ``ctx`` as they come.
    """
    if style is Style.ASYNC:
        return as_final(await fn(ctx, data))
    if style is Style.SYNC:
        return as_final(await in_thread(executor, fn, ctx, data))
    if style is Style.ASYNC_GEN:
        agen = fn(ctx, data)
        try:
            async for item in agen:
                if isinstance(item, Reply):
                    return item
                await ctx.send_partial(item)
        finally:
            await agen.aclose()
        return Reply()
    gen = fn(ctx, data)
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = in_thread(executor, next, gen, _END)
            item = await step
            if item is _END:
                return Reply()
            if isinstance(item, Reply):
                return item
            await ctx.send_partial(item)
    finally:
        if step is not None and not step.done():
            # Cancelled while the thread runs the generator: close it once that step ends
            # (closing a running generator from another thread is an error).
            step.add_done_callback(lambda _: executor.submit(gen.close))
        else:
            gen.close()


async def run_event(fn: Callable[..., Any], style: Style, args: tuple[Any, ...], executor: Executor) -> None:
    """Calls a handler of something that gets no reply (event, frame, connect, disconnect)."""
    if style is Style.ASYNC:
        await fn(*args)
    elif style is Style.SYNC:
        await in_thread(executor, fn, *args)
    else:
        raise TypeError(f"{style.value} handlers are only allowed for requests")
