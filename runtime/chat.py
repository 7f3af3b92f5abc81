"""Chat templates: the file's embedded Jinja template rendered the way transformers renders it (sandboxed, immutable,
trim_blocks/lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII, `raise_exception`, `strftime_now`), and
bounded, because the template comes with the file and a file can come from anyone.

The sandbox keeps a template from reaching Python; the bounds keep it from hanging or exhausting memory: rendering
stops after RENDER_SECONDS (checked on every line the compiled template runs, and on every call it makes), every
value it builds — by `*`, `**`, `+`, `%`, `~`, a call, a filter — and the output stay within the size the caller
allows (what the context could hold), `range` stays the sandbox's 100 000, and templates that include, import or
extend other templates (which a file cannot carry) are refused. Every failure is one NQRunError line.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from datetime import datetime
from typing import Any, Callable

from nqfmt.errors import one_line

from .errors import NQRunError

RENDER_SECONDS = 2.0
MAX_TEMPLATE_CHARS = 1 << 20  # the largest real chat templates are tens of kilobytes
_TEMPLATE_FILE = "<template>"  # the filename Jinja compiles a template from a string under
_WIDE_FIELD = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        from jinja2 import nodes

        if len(source) > MAX_TEMPLATE_CHARS:
            raise NQRunError(f"the file's chat template has {len(source)} characters, more than the "
                             f"{MAX_TEMPLATE_CHARS} a template can have")
        self._env = env = _bounded_environment()
        try:
            tree = env.parse(source)
            refs = sorted({type(n).__name__.lower() for n in tree.find_all((nodes.Extends, nodes.Include,
                                                                             nodes.Import, nodes.FromImport))})
            if refs:
                raise NQRunError(f"the file's chat template uses {', '.join(refs)}, which needs template files a "
                                 f".nq file does not carry")
            self._template = env.from_string(tree)
        except NQRunError:
            raise
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise NQRunError(f"the file's chat template does not parse: {one_line(e)}") from None
        except Exception as e:  # RecursionError, MemoryError ... from a pathological template
            raise NQRunError(f"the file's chat template cannot be compiled ({type(e).__name__}: {one_line(e)})") \
                from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               limit: int = 1 << 20) -> str:
        """The prompt text for a conversation: a list of {"role": ..., "content": ...}. `limit` bounds, in
        characters, the output and every value the template builds."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise NQRunError(f"chat message {m!r} needs 'role' and 'content'")
        budget = _Budget(limit, time.perf_counter() + RENDER_SECONDS)
        pieces: list[str] = []
        total = 0
        previous = sys.gettrace()
        self._env.renders.budget = budget
        sys.settrace(budget.trace)
        try:
            stream = self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token)
            try:
                for piece in stream:
                    total += len(piece)
                    if total > limit:
                        raise budget.too_big("its output")
                    pieces.append(piece)
            finally:
                stream.close()
        except NQRunError:
            raise
        except Exception as e:  # whatever the template raises: TemplateError, TypeError, RecursionError, MemoryError
            import jinja2
            what = one_line(e) if isinstance(e, jinja2.exceptions.TemplateError) else \
                f"{type(e).__name__}: {one_line(e)}"
            raise NQRunError(f"chat template: {what}") from None
        finally:
            sys.settrace(previous)
            self._env.renders.budget = None
        return "".join(pieces)


class _Budget:
    """One render's limits: a deadline and a size (characters) no value or output may exceed."""

    def __init__(self, limit: int, deadline: float) -> None:
        self.limit, self.deadline = limit, deadline

    def too_big(self, what: str) -> NQRunError:
        return NQRunError(f"chat template: {what} would exceed {self.limit} characters, more than the context can "
                          f"hold")

    def tick(self) -> None:
        if time.perf_counter() > self.deadline:
            raise NQRunError(f"chat template: rendering took more than {RENDER_SECONDS:g} s")

    def check(self, value: Any, what: str) -> Any:
        if _size(value, self.limit) > self.limit:
            raise self.too_big(what)
        return value

    def trace(self, frame, event, arg):  # noqa: ANN001 (sys.settrace's signature)
        """Trace only the compiled template's frames, checking the deadline on each line they run."""
        if frame.f_code.co_filename != _TEMPLATE_FILE:
            return None
        self.tick()
        return self._line

    def _line(self, frame, event, arg):  # noqa: ANN001
        self.tick()
        return self._line


def _size(value: Any, limit: int) -> int:
    """Characters `value` would take as text, counting each container element and each shared reference (a join or
    tojson writes every one out); stops counting past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 1
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, dict):
            total += 1 + len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 1 + len(v)
            stack.extend(v)
        else:
            total += 1
    return total


def _bounded_environment():
    """Jinja's immutable sandbox with transformers' settings and the render budget wired into binary operators,
    calls, filters, string concatenation (`~`) and output."""
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.ext import loopcontrols
    from jinja2.runtime import str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.exceptions import TemplateError

    class BoundedCodeGenerator(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node, frame) -> None:  # noqa: ANN001 (Jinja's visitor signature)
            """`a ~ b ~ ...` through the environment, so the joined size is checked before it is built."""
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        renders = threading.local()  # the budget of the render running in each thread (nqserve renders in several)

        @property
        def budget(self) -> _Budget | None:
            return getattr(self.renders, "budget", None)

        def call_binop(self, context, op: str, left: Any, right: Any) -> Any:  # noqa: ANN001
            b = self.budget
            if b is not None:
                b.tick()
                _check_binop(b, op, left, right)
            result = self.binop_table[op](left, right)
            return result if b is None else b.check(result, f"the result of {op!r}")

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805, ANN001
            b = __self.budget
            if b is not None:
                b.tick()
                b.check((args, kwargs), "a call's arguments")
                _check_format_call(b, __obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            return result if b is None else b.check(result, "a call's result")

        def bounded_join(self, parts: tuple) -> str:
            if self.budget is not None:
                self.budget.check(parts, "a concatenation")
            return str_join(parts)

        def bounded_output(self, value: Any) -> Any:
            return value if self.budget is None else self.budget.check(value, "its output")

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # noqa: ANN001
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        if not isinstance(fmt, str):
            raise TemplateError(f"strftime_now needs a format string, got {type(fmt).__name__}")
        try:
            return datetime.now().strftime(fmt)
        except (ValueError, UnicodeError) as e:
            raise TemplateError(f"strftime_now({fmt!r}): {e}") from None

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.finalize = env.bounded_output
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(env, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    del env.globals["lipsum"]  # unbounded loops in Python; no chat template uses it
    return env


def _check_binop(b: _Budget, op: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, a product, power or format whose result would exceed the budget."""
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0 and \
                    _size(seq, b.limit) * n > b.limit:
                raise b.too_big(f"'*' of a {type(seq).__name__}")
        if ints and left.bit_length() + right.bit_length() > 3 * b.limit:
            raise b.too_big("a product")
    elif op == "**" and ints and right > 0 and max(left.bit_length(), 1) * right > 3 * b.limit:
        raise b.too_big("a power")
    elif op == "%" and isinstance(left, str):
        _check_format(b, left, right)


def _check_format(b: _Budget, fmt: str, args: Any) -> None:
    """A %-format or str.format string may not ask for a width or precision beyond the budget (`*` widths come from
    the arguments, which then may not hold a number that large)."""
    if _WIDE_FIELD.search(fmt):
        raise b.too_big("a formatted field")
    values = args if isinstance(args, (tuple, list)) else (args,)
    if "*" in fmt and any(isinstance(v, int) and abs(v) > b.limit for v in values):
        raise b.too_big("a formatted field")


def _check_format_call(b: _Budget, obj: Any, args: tuple, kwargs: dict) -> None:
    """str.format / str.format_map (the sandbox wraps them; the string is the wrapped method's self)."""
    inner = getattr(obj, "__wrapped__", obj)
    target = getattr(inner, "__self__", None)
    if isinstance(target, str) and getattr(inner, "__name__", "") in ("format", "format_map"):
        if _WIDE_FIELD.search(target) or any(isinstance(v, int) and abs(v) > b.limit
                                             for v in (*args, *kwargs.values())):
            raise b.too_big("a formatted field")


def _bounded_filter(env, f: Callable) -> Callable:  # noqa: ANN001
    """A filter whose arguments (after the value) may not hold a number beyond the budget (widths, counts) and whose
    value and result stay within it; `format` and `replace` are checked before they run."""
    passes = getattr(f, "jinja_pass_arg", None) is not None

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        b = env.budget
        if b is None:
            return f(*args, **kwargs)
        b.tick()
        value, rest = (args[1:2], args[2:]) if passes else (args[:1], args[1:])
        b.check((value, rest, kwargs), f"the arguments of filter {f.__name__!r}")
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > b.limit for v in (*rest, *kwargs.values())):
            raise b.too_big(f"filter {f.__name__!r}")
        if f.__name__ == "do_format" and value and isinstance(value[0], str):
            _check_format(b, value[0], rest)
        if f.__name__ == "do_replace" and value and len(rest) >= 2 and all(isinstance(s, str) for s in rest[:2]):
            s, (old, new) = str(value[0]), rest[:2]
            if len(s) + (s.count(old) if old else len(s) + 1) * len(new) > b.limit:
                raise b.too_big("filter 'replace'")
        return b.check(f(*args, **kwargs), f"the result of filter {f.__name__!r}")

    return bounded

