"""A small, safe expression language for rules and costs. Nothing here ever calls ``eval``.

Used for the spec's ``failure`` rule (``m_ssim < 0.5 or m_mae > 1``), its ``cost``
(``depth * filters * kernel ** 2``), string entries of ``exclude`` and the ``--where`` of
``gridrunner reset``. The grammar, loosest binding first::

    expr   := and ("or" and)*
    and    := not ("and" not)*
    not    := "not" not | cmp
    cmp    := sum (("<" | "<=" | ">" | ">=" | "==" | "!=" | "in" | "not in") sum)?
    sum    := prod (("+" | "-") prod)*
    prod   := unary (("*" | "/" | "%") unary)*
    unary  := ("-" | "+") unary | power
    power  := atom ("**" unary)?
    atom   := number | string | name | "true" | "false" | "none"
            | "(" expr ")" | "[" expr ("," expr)* "]" | func "(" expr ("," expr)* ")"
    func   := abs | min | max | log | log2 | log10 | sqrt | exp | len | sum

Names are looked up in a mapping (one row's parameters and outcomes), and evaluation works on plain
Python values, one row at a time: the worker, ``make``, ``reset --where`` and the analysis
(``analysis.rows.rule_mask``) all judge a rule so, on the same decoded values, so they agree.
Conditions have three values, as in SQL: a comparison with a missing, ``None``, NaN or non-comparable
value is *unknown*, ``not`` of unknown is unknown, ``and`` is false if either side is false and ``or``
true if either side is true, and unknown otherwise. A rule fires only when it is true, so a missing value
never fires one, even under ``not`` (``not (acc > 0.5)`` does not fire on a record without ``acc``).
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

from gridrunner.errors import ExprError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>\*\*|<=|>=|==|!=|[<>+\-*/%(),\[\]])
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "none", "True", "False", "None"}
_CONSTANTS = {"true": True, "True": True, "false": False, "False": False, "none": None, "None": None}
#: The node kinds a rule's top may have: those that say true or false.
CONDITIONS = ("or", "and", "not", "cmp", "in")
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "%": operator.mod, "**": operator.pow}
_FUNCS = {
    "abs": abs,
    "min": min,
    "max": max,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "len": len,
    "sum": sum,
}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ExprError(text, f"unexpected character {text[pos:].lstrip()[0]!r}", len(text) - len(text[pos:].lstrip()))
        kind = match.lastgroup
        start = match.start(kind)
        tokens.append(_Tok(kind, match.group(kind), start))
        pos = match.end()
    tokens.append(_Tok("end", "", len(text)))
    return tokens


#: How deeply parentheses, lists, calls, signs, ``not`` and powers may nest. The parser recurses up to ten
#: times per level, the evaluator once or twice: without a limit, "((((...1...))))" from a spec would overflow
#: Python's stack instead of giving an error.
MAX_NESTING = 50


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def nested(self, parse):
        """``parse()`` one level deeper; an :class:`ExprError` past ``MAX_NESTING`` levels."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExprError(self.text, f"nested more than {MAX_NESTING} levels deep", self.tokens[self.i].pos)
        try:
            return parse()
        finally:
            self.depth -= 1

    def peek(self, *texts: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind in ("op", "name") and tok.text in texts

    def take(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            found = "the end" if tok.kind == "end" else repr(tok.text)
            raise ExprError(self.text, f"expected {text!r}, found {found}", tok.pos)

    def parse(self):
        if self.tokens[0].kind == "end":
            raise ExprError(self.text, "empty expression")
        node = self.or_()
        tok = self.tokens[self.i]
        if tok.kind != "end":
            raise ExprError(self.text, f"unexpected {tok.text!r}", tok.pos)
        return node

    def or_(self):
        node = self.and_()
        while self.peek("or"):
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self):
        node = self.not_()
        while self.peek("and"):
            self.take()
            node = ("and", node, self.not_())
        return node

    def not_(self):
        if self.peek("not"):
            self.take()
            return ("not", self.nested(self.not_))
        return self.cmp()

    def cmp(self):
        node = self.sum()
        if self.peek(*_COMPARE):
            op = self.take().text
            return ("cmp", op, node, self.sum())
        if self.peek("in"):
            self.take()
            return ("in", node, self.sum())
        if self.peek("not") and self.tokens[self.i + 1].text == "in":
            self.i += 2
            return ("not", ("in", node, self.sum()))
        return node

    def sum(self):
        node = self.prod()
        while self.peek("+", "-"):
            op = self.take().text
            node = ("arith", op, node, self.prod())
        return node

    def prod(self):
        node = self.unary()
        while self.peek("*", "/", "%"):
            op = self.take().text
            node = ("arith", op, node, self.unary())
        return node

    def unary(self):
        if self.peek("-", "+"):
            op = self.take().text
            operand = self.nested(self.unary)
            return ("neg", operand) if op == "-" else operand
        return self.power()

    def power(self):
        node = self.atom()
        if self.peek("**"):
            self.take()
            node = ("arith", "**", node, self.nested(self.unary))
        return node

    def atom(self):
        tok = self.take()
        if tok.kind == "number":
            return ("const", float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text))
        if tok.kind == "string":
            return ("const", _unquote(tok.text))
        if tok.kind == "name":
            if tok.text in _CONSTANTS:
                return ("const", _CONSTANTS[tok.text])
            if tok.text in _KEYWORDS:
                raise ExprError(self.text, f"unexpected {tok.text!r}", tok.pos)
            if self.peek("("):
                if tok.text not in _FUNCS:
                    raise ExprError(self.text, f"unknown function {tok.text!r} (known: {', '.join(sorted(_FUNCS))})", tok.pos)
                self.take()
                args = self.items(")")
                return ("call", tok.text, args)
            return ("name", tok.text)
        if tok.text == "(":
            node = self.nested(self.or_)
            self.expect(")")
            return node
        if tok.text == "[":
            return ("list", self.items("]"))
        found = "the end" if tok.kind == "end" else repr(tok.text)
        raise ExprError(self.text, f"expected a number, string, name or '(', found {found}", tok.pos)

    def items(self, closing: str) -> list:
        items = [self.nested(self.or_)]
        while self.peek(","):
            self.take()
            items.append(self.nested(self.or_))
        self.expect(closing)
        return items


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _names(node) -> set[str]:
    kind = node[0]
    if kind == "name":
        return {node[1]}
    if kind == "const":
        return set()
    if kind in ("list", "call"):
        items = node[1] if kind == "list" else node[2]
        return set().union(*(_names(n) for n in items))
    return set().union(*(_names(n) for n in node[1:] if isinstance(n, tuple)))


class Expr:
    """A parsed expression. ``Expr("depth * filters").evaluate({"depth": 3, "filters": 8}) == 24``."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise ExprError(str(text), f"expected a string, got {type(text).__name__}")
        self.text = text
        self.tree = _Parser(text).parse()

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"

    @cached_property
    def names(self) -> set[str]:
        """Every name the expression reads."""
        return _names(self.tree)

    def check_names(self, allowed, what: str = "name") -> None:
        """Raise :class:`ExprError` naming the first unknown name and the valid ones."""
        unknown = sorted(self.names - set(allowed))
        if unknown:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ExprError(self.text, f"unknown {what} {unknown[0]!r} (valid: {valid})")

    @property
    def is_condition(self) -> bool:
        """Whether it says true or false: a comparison, ``in``, or ``and``/``or``/``not`` at its top."""
        return self.tree[0] in CONDITIONS

    def check_condition(self, example: str = "m_ssim < 0.5") -> None:
        """Raise :class:`ExprError` unless it is a condition: a rule such as ``score + 1`` or ``depth`` would
        select every row where the value is not 0."""
        if not self.is_condition:
            raise ExprError(self.text, f"a rule must be a condition (a comparison, 'in', 'and', 'or', 'not'), "
                                       f"such as {example!r}")

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """Evaluate on one row. A condition gives True, False or None (unknown: it read a missing, None or NaN
        value, see the module docstring); arithmetic on a missing value gives None."""
        try:
            return _eval(self.tree, values, self.text)
        except _Missing:
            return None


def parse(text: str) -> Expr:
    """Parse ``text`` or raise :class:`ExprError` with the column of the problem."""
    return Expr(text)


class _Missing(Exception):
    """A name or value that cannot take part in the computation (missing, None, wrong type)."""


def _eval(node, values, text):
    kind = node[0]
    if kind == "or":
        left = _truth(node[1], values, text)
        if left is True:
            return True
        right = _truth(node[2], values, text)
        return True if right is True else (None if left is None or right is None else False)
    if kind == "and":
        left = _truth(node[1], values, text)
        if left is False:
            return False
        right = _truth(node[2], values, text)
        return False if right is False else (None if left is None or right is None else True)
    if kind == "not":
        value = _truth(node[1], values, text)
        return None if value is None else not value
    try:
        if kind == "cmp":
            left, right = _eval(node[2], values, text), _eval(node[3], values, text)
            if _unknown(left) or _unknown(right):
                return None
            return bool(_COMPARE[node[1]](left, right))
        if kind == "in":
            left, right = _eval(node[1], values, text), _eval(node[2], values, text)
            if _unknown(left):
                return None
            return left in right
    except (_Missing, TypeError):
        return None
    if kind == "const":
        return node[1]
    if kind == "name":
        if node[1] not in values:
            raise _Missing
        return values[node[1]]
    if kind == "list":
        return [_eval(n, values, text) for n in node[1]]
    if kind == "neg":
        return -_number(_eval(node[1], values, text))
    if kind == "arith":
        left, right = _number(_eval(node[2], values, text)), _number(_eval(node[3], values, text))
        if node[1] == "**":
            return _power(left, right)
        try:
            return _ARITH[node[1]](left, right)
        except ZeroDivisionError:
            return math.nan
    if kind == "call":
        func = _FUNCS[node[1]]
        args = [_eval(n, values, text) for n in node[2]]
        for arg in args:
            if arg is None:
                raise _Missing  # max(0.01, k) on a row whose k is null: unknown, like arithmetic on it
        try:
            return func(*args)
        except OverflowError:
            return math.inf  # exp(1000): too large for a float, as numpy has it
        except ZeroDivisionError:
            return math.nan  # log(x, 1), like a division by zero in arithmetic
        except (ValueError, TypeError) as err:
            raise ExprError(text, f"{node[1]}() failed: {err}") from None
    raise AssertionError(kind)  # unreachable: the parser builds only the kinds above


#: An integer power whose result would need more bits than this is computed in floating point: Python's
#: exact ``9 ** 9 ** 9`` would take minutes and gigabytes, and a rule is evaluated on every row.
MAX_EXACT_POWER_BITS = 4096


def _power(base, exponent):
    """``base ** exponent``, never hanging on huge integers; a result too large for a float is ±inf."""
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0
            and base.bit_length() * exponent > MAX_EXACT_POWER_BITS):
        base = float(base)
    try:
        return base ** exponent
    except OverflowError:
        negative = base < 0 and isinstance(exponent, int) and exponent % 2 == 1
        return -math.inf if negative else math.inf
    except ZeroDivisionError:  # 0 ** -1
        return math.nan


def _truth(node, values, text) -> bool | None:
    """A node's truth: True, False, or None when it is unknown (it read a missing, None or NaN value)."""
    try:
        value = _eval(node, values, text)
    except (_Missing, TypeError):
        return None
    return None if _unknown(value) else bool(value)


def _unknown(value) -> bool:
    return value is None or _is_nan(value)


def _number(value):
    if value is None or isinstance(value, (str, list, dict)):
        raise _Missing
    return value


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
