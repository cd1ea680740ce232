"""Row filters on the samples table: keyword selections and a small, safe `--where` language.

The language (parsed here, never evaluated as Python):

    expr     := or ;  or := and ("or" and)* ;  and := not ("and" not)*
    not      := "not" not | "(" expr ")" | compare
    compare  := value (op value)+          # chained: 2 <= t < 5
              | NAME ["not"] "in" "[" literal ("," literal)* "]"   (or parentheses)
    op       := == | != | < | <= | > | >=
    value    := NAME | literal ;  literal := number | 'string' | "string" | true | false

Examples: ``class == 'rp' and t < 4``, ``split in ['train', 'val'] and not trajectory == 3``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gradlake.errors import InputError

_TOKEN = re.compile(
    r"\s*(?:(?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<string>'[^']*'|\"[^\"]*\")"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|<|>)"
    r"|(?P<punct>[()\[\],]))"
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false"}
_COMPARE = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal,
            ">": pc.greater, ">=": pc.greater_equal}


def select(classes: Iterable[str] | None = None, splits: Iterable[str] | None = None,
           trajectories: Iterable[int] | None = None, t_min: int | None = None,
           t_max: int | None = None) -> pc.Expression | None:
    """A filter from keyword selections (t_min and t_max inclusive); None selects all."""
    parts = []
    if classes is not None:
        parts.append(pc.field("class").isin(list(classes)))
    if splits is not None:
        parts.append(pc.field("split").isin(list(splits)))
    if trajectories is not None:
        parts.append(pc.field("trajectory").isin([int(n) for n in trajectories]))
    if t_min is not None:
        parts.append(pc.field("t") >= int(t_min))
    if t_max is not None:
        parts.append(pc.field("t") <= int(t_max))
    return combine(*parts)


def combine(*expressions: pc.Expression | None) -> pc.Expression | None:
    """The conjunction of the given filters (None entries ignored)."""
    result = None
    for expr in expressions:
        if expr is not None:
            result = expr if result is None else result & expr
    return result


def parse_where(text: str, schema: pa.Schema, source: str = "--where") -> pc.Expression:
    """Parse a `--where` expression against the columns of ``schema``."""
    return _Parser(text, schema, source).parse()


class _Parser:
    def __init__(self, text: str, schema: pa.Schema, source: str):
        self.text, self.schema, self.source = text, schema, source
        self.tokens = self._tokenize(text)
        self.pos = 0

    def error(self, message: str, at: int | None = None) -> InputError:
        where = self.tokens[at if at is not None else self.pos][2] if self.tokens else 0
        return InputError(f"{self.source} {self.text!r}: {message} (at character {where})")

    def _tokenize(self, text: str) -> list[tuple[str, Any, int]]:
        tokens, i = [], 0
        while i < len(text):
            if text[i:].strip() == "":
                break
            m = _TOKEN.match(text, i)
            if not m:
                raise InputError(f"{self.source} {text!r}: cannot read {text[i:].strip()[:20]!r} "
                                 f"(at character {i})")
            kind = m.lastgroup
            raw = m.group(kind)
            start = m.start(kind)
            if kind == "number":
                value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            elif kind == "string":
                value = raw[1:-1]
            elif kind == "name" and raw.lower() in _KEYWORDS:
                kind, value = "keyword", raw.lower()
            else:
                value = raw
            tokens.append((kind, value, start))
            i = m.end()
        tokens.append(("end", None, len(text)))
        return tokens

    def peek(self, kind: str, value: Any = None) -> bool:
        tk, tv, _ = self.tokens[self.pos]
        return tk == kind and (value is None or tv == value)

    def take(self, kind: str, value: Any = None, expected: str = "") -> Any:
        if not self.peek(kind, value):
            tk, tv, _ = self.tokens[self.pos]
            found = "the end" if tk == "end" else repr(tv)
            raise self.error(f"expected {expected or value or kind}, found {found}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def parse(self) -> pc.Expression:
        if self.peek("end"):
            raise self.error("empty expression")
        expr = self.parse_or()
        self.take("end", expected="'and', 'or' or the end")
        return expr

    def parse_or(self) -> pc.Expression:
        expr = self.parse_and()
        while self.peek("keyword", "or"):
            self.pos += 1
            expr = expr | self.parse_and()
        return expr

    def parse_and(self) -> pc.Expression:
        expr = self.parse_not()
        while self.peek("keyword", "and"):
            self.pos += 1
            expr = expr & self.parse_not()
        return expr

    def parse_not(self) -> pc.Expression:
        if self.peek("keyword", "not"):
            self.pos += 1
            return ~self.parse_not()
        if self.peek("punct", "("):
            self.pos += 1
            expr = self.parse_or()
            self.take("punct", ")", "')'")
            return expr
        return self.parse_compare()

    def parse_compare(self) -> pc.Expression:
        start = self.pos
        left = self.parse_value()
        negate = self.peek("keyword", "not")
        if negate or self.peek("keyword", "in"):
            if left[0] != "column":
                raise self.error("'in' needs a column name on its left", start)
            if negate:
                self.pos += 1
            self.take("keyword", "in", "'in'")
            members = self.parse_list(left)
            expr = pc.field(left[1]).isin(members)
            return ~expr if negate else expr
        if not self.peek("op"):
            raise self.error("expected a comparison (==, !=, <, <=, >, >=) or 'in'")
        expr = None
        while self.peek("op"):
            op = self.take("op")
            right = self.parse_value()
            part = self.compare(left, op, right, start)
            expr = part if expr is None else expr & part
            left = right
        return expr

    def parse_list(self, column: tuple[str, Any]) -> list[Any]:
        close = {"[": "]", "(": ")"}
        opener = self.take("punct", expected="'[' or '('")
        if opener not in close:
            raise self.error("expected '[' or '(' after 'in'", self.pos - 1)
        values = []
        while True:
            at = self.pos
            kind, value = self.parse_value()
            if kind == "column":
                raise self.error(f"expected a literal in the list, found column {value!r}", at)
            self.check_type(column[1], value, at)
            values.append(value)
            if self.peek("punct", ","):
                self.pos += 1
                if not self.peek("punct", close[opener]):
                    continue
            self.take("punct", close[opener], repr(close[opener]))
            return values

    def parse_value(self) -> tuple[str, Any]:
        at = self.pos
        kind, value, _ = self.tokens[self.pos]
        if kind == "name":
            self.pos += 1
            if value not in self.schema.names:
                raise self.error(
                    f"unknown column {value!r}; the columns are: {', '.join(self.schema.names)}", at
                )
            return "column", value
        if kind in ("number", "string"):
            self.pos += 1
            return "literal", value
        if kind == "keyword" and value in ("true", "false"):
            self.pos += 1
            return "literal", value == "true"
        found = "the end" if kind == "end" else repr(value)
        raise self.error(f"expected a column name or a value, found {found}", at)

    def compare(self, left, op: str, right, at: int) -> pc.Expression:
        if left[0] == "literal" and right[0] == "literal":
            raise self.error("a comparison needs at least one column name", at)
        for side, other in ((left, right), (right, left)):
            if side[0] == "column" and other[0] == "literal":
                self.check_type(side[1], other[1], at)
        operand = [pc.field(v) if k == "column" else pc.scalar(v) for k, v in (left, right)]
        return _COMPARE[op](*operand)

    def check_type(self, column: str, value: Any, at: int) -> None:
        tp = self.schema.field(column).type
        text = pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_dictionary(tp)
        number = pa.types.is_integer(tp) or pa.types.is_floating(tp)
        ok = (isinstance(value, str) and text) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and number
        ) or (isinstance(value, bool) and pa.types.is_boolean(tp))
        if not ok:
            raise self.error(f"column {column!r} holds {tp}, compared with {value!r}", at)

