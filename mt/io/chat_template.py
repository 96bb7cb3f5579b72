"""A chat template rendered by transformers' jinja sandbox, bounded in time and size: a hostile template (a 10^10-step
loop, a string doubled a hundred times) is reported, never waited for."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

RENDER_SECONDS = 5.0  # a rendering of one conversation that takes longer does not end
RENDER_CHARS = 1 << 20


class TemplateRunaway(Exception):
    """The rendering ran past RENDER_SECONDS or RENDER_CHARS; the message says which."""


class _Expired(BaseException):
    """Raised into the rendering by SIGALRM (a BaseException: jinja and transformers catch Exception)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` raises into the code running in the main thread; elsewhere no limit can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_bounded(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **options)`; TemplateRunaway when it runs too long
    or renders too much. Exceptions the template raises pass through."""
    try:
        with _time_limit(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except _Expired:
        raise TemplateRunaway(f"over {RENDER_SECONDS:g} s") from None
    if len(text) > RENDER_CHARS:
        raise TemplateRunaway(f"over {RENDER_CHARS:,} characters")
    return text


class _TemplateOnly:
    """apply_chat_template for a bare template (a GGUF's), through transformers' own jinja renderer."""

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False, chat_template: str = "",
                            **options: Any) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template, **options)
        return rendered[0]


def render_template(template: str, messages: list[dict[str, Any]], **options: Any) -> str:
    """`template` (jinja, as a GGUF or tokenizer_config.json carries it) rendered as transformers renders it, bounded as
    render_bounded is; `options` are the template's variables (add_generation_prompt, bos_token …)."""
    return render_bounded(_TemplateOnly(), messages, chat_template=template, **options)
