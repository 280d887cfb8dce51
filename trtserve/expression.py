"""Backend expressions in TorchPipe's syntax: ``A``, ``A[B]``, ``S[A,B[C]]``, ``Sequential[...]``.

Grammar (whitespace between tokens is ignored)::

    expr  := name [ "[" expr ("," expr)* "]" ]
    name  := identifier

``A[B]`` means A wraps B; ``S[A,B]`` runs A then B.  Errors give the 0-based position.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import Backend, backend_class, did_you_mean, find_backend, init_contract_problem, registered_names
from .errors import ConfigError


class ExpressionError(ConfigError):
    """A malformed backend expression; ``details['position']`` is the 0-based column."""


@dataclass(frozen=True)
class Expr:
    name: str
    children: tuple[Expr, ...] = ()
    position: int = 0

    def __str__(self) -> str:
        if not self.children:
            return self.name
        return f"{self.name}[{','.join(str(c) for c in self.children)}]"

    def names(self) -> list[str]:
        """Every backend name in the expression, depth first."""
        out = [self.name]
        for child in self.children:
            out.extend(child.names())
        return out


def parse(text: str) -> Expr:
    if not isinstance(text, str):
        raise ExpressionError(
            f"backend expression must be a string, got {type(text).__name__}", expression=repr(text), position=0
        )
    parser = _Parser(text)
    expr = parser.expr()
    parser.skip_space()
    if parser.pos != len(text):
        char = text[parser.pos]
        hint = "unbalanced ']'" if char == "]" else f"unexpected {char!r}"
        parser.fail(f"{hint} after a complete expression")
    return expr


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str, position: int | None = None) -> None:
        pos = self.pos if position is None else position
        pointer = f"\n    {self.text}\n    {' ' * pos}^"
        raise ExpressionError(
            f"bad backend expression {self.text!r} at position {pos}: {what}{pointer}",
            expression=self.text,
            position=pos,
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def name(self) -> tuple[str, int]:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] == "_"):
            self.pos += 1
        word = self.text[start : self.pos]
        if not word:
            found = repr(self.text[start]) if start < len(self.text) else "end of string"
            self.fail(f"expected a backend name, found {found}")
        if not word.isidentifier():
            self.fail(f"{word!r} is not a valid backend name (names start with a letter or '_')", start)
        return word, start

    def expr(self) -> Expr:
        word, start = self.name()
        self.skip_space()
        if self.pos >= len(self.text) or self.text[self.pos] != "[":
            return Expr(word, (), start)
        open_pos = self.pos
        self.pos += 1
        children = [self.expr()]
        while True:
            self.skip_space()
            if self.pos >= len(self.text):
                self.fail(f"unbalanced '[' opened at position {open_pos}: missing ']'", open_pos)
            char = self.text[self.pos]
            self.pos += 1
            if char == "]":
                return Expr(word, tuple(children), start)
            if char != ",":
                self.fail(f"expected ',' or ']', found {char!r}", self.pos - 1)
            children.append(self.expr())


def resolve(expr: Expr, source: str = "") -> None:
    """Check that every name is registered and takes the number of children it is given."""
    where = f"{source}: " if source else ""
    cls = find_backend(expr.name)
    if cls is None:
        raise ExpressionError(
            f"{where}unknown backend {expr.name!r} at position {expr.position}"
            f"{did_you_mean(expr.name, registered_names())}; register it with trtserve.register(name, cls) "
            "or ship it in the model's backend.py",
            backend=expr.name,
            position=expr.position,
        )
    problem = init_contract_problem(cls)
    if problem is not None:
        raise ConfigError(f"{where}{problem}", backend=expr.name)
    arity, given = cls.children_arity, len(expr.children)
    if isinstance(arity, tuple):  # several forms, e.g. SyncTensor and SyncTensor[X]
        if given not in arity:
            raise ExpressionError(
                f"{where}{expr.name} at position {expr.position} takes {' or '.join(map(str, arity))} "
                f"inner backends, got {given}",
                backend=expr.name,
                position=expr.position,
            )
        arity = given
    if arity == 0 and given:
        raise ExpressionError(
            f"{where}{expr.name} at position {expr.position} does not wrap other backends; "
            f"remove the [...] after it",
            backend=expr.name,
            position=expr.position,
        )
    if arity is None and not given:
        raise ExpressionError(
            f"{where}{expr.name} at position {expr.position} needs at least one inner backend, e.g. {expr.name}[A,B]",
            backend=expr.name,
            position=expr.position,
        )
    if arity and given != arity:
        raise ExpressionError(
            f"{where}{expr.name} at position {expr.position} wraps exactly {arity} backend(s), got {given}, "
            f"e.g. {expr.name}[Inner]",
            backend=expr.name,
            position=expr.position,
        )
    for child in expr.children:
        resolve(child, source)


def instantiate(expr: Expr, config: dict, scope: dict[str, type[Backend]] | None = None) -> Backend:
    """Build the (not yet initialised) backend tree for one instance; names resolve in
    ``scope`` (the model's own backends) first."""
    backend = backend_class(expr.name, scope)()
    # Set here as well as in Backend.init, so max()/min() work even when a user's backend
    # overrides __init__ or init without calling super().
    backend.config = config
    backend.children = [instantiate(child, config, scope) for child in expr.children]
    return backend
