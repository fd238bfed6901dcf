"""The vocabulary of README's Conventions, checked on every public signature.

Walks ``flowscore.__all__`` (and the public functions and classes of the modules it lists) with
``inspect.signature``: argument order (model, then path, then the data or the count), one name per concept
(no ``x0``/``x1``, ``method``, ``num_threads``, ``kind`` for a prediction), ``generator`` a
``torch.Generator`` and ``seed`` an ``int``, and no return annotation mixing a tuple with something else
(a return that changes shape with a flag). A public name that an earlier issue fixed as a contract and
that breaks a rule is listed below, once, with the reason; a deprecated spelling is allowed when it is
keyword-only with default None (it warns when used).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator

import pytest
import torch

import flowscore as fs

FORBIDDEN = {"x0": "x_data / noise", "x1": "x_data / noise", "method": "sampler",
             "num_threads": "threads", "n_threads": "threads", "kind": "prediction"}  # fmt: skip
DATA_NAMES = ("x_data", "n", "data")  # x beside t is a point of the path, called as (x, t)
MODEL_NAMES = ("model", "field", "velocity_field", "denoiser", "net")

# (public name, rule): why the contract stays as it is
EXCEPTIONS = {
    ("losses.cfm", "order"): "cfm(model, x_data, path): the losses' signature, a contract of earlier issues",
    ("losses.dsm", "order"): "dsm(model, x_data, path), as cfm",
    ("sample", "tuple"): "return_nfe / return_trajectory predate SampleResult; return_info=True gives it",
    ("encode", "tuple"): "as sample",
    ("sample_ode", "tuple"): "return_trajectory predates SampleResult (a low-level integrator)",
    ("sample_sde", "tuple"): "as sample_ode",
    (
        "flowmaps.sample_jumps",
        "tuple",
    ): "fs.sample's jumps (issue 15), with sample's return_nfe / return_trajectory",
    ("samplers.integrate", "tuple"): "the integrator under sample_ode, with the same return_trajectory",
    ("objectives.objective_from_config", "order"): "a factory of the config: the config, the path built from "
    "it, then the network it wraps (optional), in the config's own order",
}


def _public() -> Iterator[tuple[str, Callable]]:
    """(name, callable) for each callable of ``fs.__all__`` and each public function/class defined in a
    module listed there, once: a module's member that ``fs`` exports itself (``samplers.sample`` is
    ``fs.sample``) is walked under its top-level name only."""
    top = {id(getattr(fs, name)) for name in fs.__all__}
    for name in fs.__all__:
        obj = getattr(fs, name)
        if isinstance(obj, types.ModuleType):
            for sub in getattr(obj, "__all__", [n for n in vars(obj) if not n.startswith("_")]):
                member = getattr(obj, sub)
                own = callable(member) and getattr(member, "__module__", None) == obj.__name__
                if own and id(member) not in top:
                    yield f"{name}.{sub}", member
        elif callable(obj):
            yield name, obj


def _signature(obj: Callable) -> inspect.Signature | None:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


PUBLIC = [
    (name, sig, dataclasses.is_dataclass(obj))
    for name, obj in _public()
    if (sig := _signature(obj)) is not None
]


def _deprecated(param: inspect.Parameter) -> bool:
    return param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None


def _union(annotation: str) -> list[str]:
    """The members of a top-level ``A | B | ...`` annotation (a ``|`` inside brackets is not split)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(annotation[start:i])
            start = i + 1
    return [*parts, annotation[start:]]


def _violations(name: str, sig: inspect.Signature, is_record: bool = False) -> list[tuple[str, str]]:
    """(rule, what) for each rule of the Conventions ``sig`` breaks (``is_record``: a dataclass, whose
    fields are a record's, not an argument order)."""
    params = sig.parameters
    found = []
    for pname, param in params.items():
        # kind: the kind of a target field (velocity/score/noise/data) beside a model's prediction is fine;
        # only a kind that stands for what a model predicts (a model and no prediction) is not
        prediction_meant = any(m in params for m in MODEL_NAMES) and "prediction" not in params
        if pname in FORBIDDEN and not _deprecated(param) and (pname != "kind" or prediction_meant):
            found.append((pname, f"parameter {pname!r}: the word is {FORBIDDEN[pname]!r}"))
        annotation = str(param.annotation)
        if pname == "generator" and "Generator" not in annotation:
            found.append(("generator", f"generator annotated {annotation}, not torch.Generator"))
        if pname == "seed" and not annotation.startswith("int"):
            found.append(("seed", f"seed annotated {annotation}, not int"))
    names = list(params)
    if "model" in params and "path" in params and not is_record:
        if names.index("model") > names.index("path"):
            found.append(("order", "path comes before model"))
        positional = [n for n in names if params[n].kind is not inspect.Parameter.KEYWORD_ONLY]
        data = [n for n in DATA_NAMES if n in positional]
        if data and "path" in positional and positional.index(data[0]) < positional.index("path"):
            found.append(("order", f"{data[0]} comes before path"))
    returned = str(sig.return_annotation).replace(" ", "")
    parts = [p for p in _union(returned) if p != "None"]
    if len(parts) > 1 and any(p.startswith("tuple") for p in parts):
        found.append(("tuple", f"returns {returned}: a shape that depends on the arguments"))
    return found


def test_the_walk_sees_the_public_api():
    """The walk finds the main entry points (a walk that found nothing would pass every rule)."""
    names = {name for name, _, _ in PUBLIC}
    assert {"sample", "encode", "Trainer", "load_run", "loss_floor", "losses.cfm", "convert"} <= names
    assert len(names) > 60


@pytest.mark.parametrize("name, sig, is_record", PUBLIC, ids=[name for name, _, _ in PUBLIC])
def test_public_signature_follows_the_conventions(name, sig, is_record):
    broken = [what for rule, what in _violations(name, sig, is_record) if (name, rule) not in EXCEPTIONS]
    assert not broken, f"{name}{sig}: " + "; ".join(broken)


def test_every_exception_is_still_needed():
    """An exception whose name now follows the rule (or is gone) is removed from the list."""
    found = {(name, rule) for name, sig, record in PUBLIC for rule, _ in _violations(name, sig, record)}
    assert not set(EXCEPTIONS) - found, sorted(set(EXCEPTIONS) - found)


def test_the_checks_catch_what_they_should():
    """Each rule rejects a signature that breaks it (the checks are not vacuous)."""

    def bad(x0, path, model, method="euler", num_threads=1, seed: float = 0.0, generator: int = 0):
        pass

    def flagged(model, x_data, path, return_nfe: bool = False) -> int | tuple[int, int]:
        return 0

    def kind_for_prediction(model, x, t, kind="velocity"):
        pass

    def kind_of_a_target(model, path, prediction, kind="velocity") -> tuple[int, int | None] | None:
        pass

    assert {rule for rule, _ in _violations("k", inspect.signature(kind_for_prediction))} == {"kind"}
    assert _violations("k", inspect.signature(kind_of_a_target)) == []

    def good(
        model, path, n, *, sampler=None, method=None, generator: torch.Generator | None = None, seed: int = 0
    ) -> int:
        return 0

    rules = {rule for rule, _ in _violations("bad", inspect.signature(bad))}
    assert rules == {"x0", "method", "num_threads", "order", "seed", "generator"}
    assert {rule for rule, _ in _violations("flagged", inspect.signature(flagged))} == {"order", "tuple"}
    assert _violations("good", inspect.signature(good)) == []
