r"""Closed-form functions of ``t`` from expression strings, parsed safely (never ``eval``).

A custom path declared from strings (``get_path("custom", alpha="sin(pi * t / 2)", beta="1 - t")``) can be
stored in a run as those strings and rebuilt from them. The grammar is a whitelist checked on Python's
``ast`` of the string: numbers, the variable ``t``, the constants ``pi`` and ``e``, the operators
``+ - * / **`` (and unary ``-``/``+``), parentheses, and one-argument calls of :data:`FUNCTIONS`. Anything
else (names, attributes, subscripts, keywords, comparisons, ...) is refused with a one-line ``ValueError``.
Evaluation is on tensors only (constants become tensors of ``t``'s dtype), so it is differentiable by
autograd and cannot overflow Python integers.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

import torch

FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "asin": torch.asin,
    "acos": torch.acos,
    "atan": torch.atan,
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "expm1": torch.expm1,
    "log": torch.log,
    "log1p": torch.log1p,
    "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid,
    "abs": torch.abs,
}
"""The functions an expression may call, each with one argument."""
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
"""Named constants besides the variable ``t``."""
MAX_LENGTH = 1000
"""Longest expression accepted (characters)."""
MAX_DEPTH = 50
"""Deepest syntax tree accepted (levels; a Python name counts two)."""

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

Node = Callable[[torch.Tensor], torch.Tensor]


def _build(node: ast.AST, fail: Callable[[str], ValueError]) -> Node:
    """A function of the tensor ``t`` computing ``node``; ``fail(reason)`` is raised for any other node."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"the constant {repr(value)[:20]} is not a real number")
        try:
            number = float(value)
        except OverflowError:
            raise fail("a number is too large for a float") from None
        return lambda t: torch.tensor(number, dtype=t.dtype, device=t.device)
    if isinstance(node, ast.Name):
        if node.id == "t":
            return lambda t: t
        if node.id in CONSTANTS:
            number = CONSTANTS[node.id]
            return lambda t: torch.tensor(number, dtype=t.dtype, device=t.device)
        raise fail(f"unknown name {node.id[:20]!r} (allowed: t, {', '.join(CONSTANTS)})")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op, left, right = _BINARY[type(node.op)], _build(node.left, fail), _build(node.right, fail)
        return lambda t: op(left(t), right(t))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        op, operand = _UNARY[type(node.op)], _build(node.operand, fail)
        return lambda t: op(operand(t))
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            raise fail(f"only the functions {', '.join(FUNCTIONS)} may be called")
        if len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred):
            raise fail(f"{name}() takes exactly one argument")
        fn, arg = FUNCTIONS[name], _build(node.args[0], fail)
        return lambda t: fn(arg(t))
    raise fail(f"{type(node).__name__} is not allowed (numbers, t, pi, e, + - * / **, and function calls)")


def compile_expression(text: object, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function ``t -> value`` written in ``text`` (grammar: module docstring).

    ``name`` labels the error message (e.g. ``"custom path: alpha"``). The returned function takes a float
    tensor ``t`` and returns a tensor broadcastable to it (0-dim for an expression without ``t``).
    """
    if not isinstance(text, str):
        raise ValueError(f"{name} must be an expression string in t, got {type(text).__name__}")
    if not text.strip() or len(text) > MAX_LENGTH:
        raise ValueError(f"{name} must be a non-empty expression of at most {MAX_LENGTH} characters")

    shown = text if len(text) <= 60 else text[:57] + "..."

    def fail(reason: str) -> ValueError:
        return ValueError(f"{name} = {shown!r}: {reason}")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        reason = err.msg if isinstance(err, SyntaxError) else type(err).__name__
        raise fail(f"not a valid expression ({reason})") from None
    if _depth(tree.body) > MAX_DEPTH:
        raise fail(f"nested too deeply (more than {MAX_DEPTH} levels of syntax)")
    return _build(tree.body, fail)


def _depth(node: ast.AST) -> int:
    """Height of the syntax tree below ``node`` (iterative: no recursion limit)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(current))
    return deepest


__all__ = ["CONSTANTS", "FUNCTIONS", "compile_expression"]
