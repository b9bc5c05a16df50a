"""Render a model's Jinja chat template, the way transformers' `apply_chat_template(tokenize=False)` does.

Reference: the Hugging Face chat-templating docs (https://huggingface.co/docs/transformers/chat_templating)
and the environment they describe: a sandboxed, immutable Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `raise_exception(msg)` global, a `tojson` filter that does
not HTML-escape, `strftime_now(fmt)`, and a `{% generation %}` block that just renders its body. Template
variables: `messages`, `add_generation_prompt`, `tools`, `documents` and the special tokens
(`bos_token`, `eos_token`, ...) passed as keyword arguments.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError

__all__ = ["render_chat"]


class _TemplateRaised(Exception):
    """Raised by `raise_exception()` inside a template."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): render as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                **special_tokens) -> str:
    """Render `messages` (a list of {"role": ..., "content": ...}) with the Jinja chat `template`.

    Extra keyword arguments (bos_token="<|im_start|>", eos_token=..., tools=..., ...) become template
    variables. A template that does not compile, calls `raise_exception`, or fails while rendering raises
    `InputError` with the template's message.
    """
    if not isinstance(template, str) or not template:
        raise InputError("no chat template: the model does not define one")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"chat template does not compile: {e.message} (line {e.lineno})") from None
    msgs = [dict(m) for m in messages]
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **special_tokens)
    except _TemplateRaised as e:
        raise InputError(f"chat template rejected the conversation: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InputError(f"chat template failed to render: {type(e).__name__}: {e}") from None
