"""The OpenAPI 3.0 document of ``romebert serve``: exactly the bodies the server accepts, and its answers.

A request body is one of: ``text`` (with an optional ``text_pair``) or ``inputs``, each with one of the
ways to choose the exit rule: nothing (the service's), ``threshold`` alone (the service's criterion),
``criterion`` and ``threshold`` (a threshold within that criterion's bounds), or the service's own
``criterion`` alone. That is a flat ``oneOf`` of closed objects (``additionalProperties: false``), since
OpenAPI 3.0 cannot close an ``allOf``. Limits that JSON Schema states (items, characters, bounds) are in
the schema; the body's byte limit is not expressible there and is stated in words (and answered 413).
"""

from __future__ import annotations

from typing import Any

from romebert.runtime.policies import POLICIES

JSON = "application/json"


def openapi_spec(service: Any) -> dict[str, Any]:
    """The document for a :class:`~romebert.deploy.service.Service` (its model, limits and policy)."""
    cfg = service.cfg
    text = _ref("Text")
    pair = {"type": "array", "items": text, "minItems": 2, "maxItems": 2, "description": "a pair of texts"}
    item = {"oneOf": [text, pair, _closed({"text": text, "text_pair": text}, ["text"])]}
    inputs = {"type": "array", "items": _ref("Input"), "minItems": 1, "maxItems": cfg.max_inputs}
    shapes = {"text": ({"text": text, "text_pair": text}, ["text"]), "inputs": ({"inputs": inputs}, ["inputs"])}
    branches = [
        {"title": f"{shape}, {rule}", **_closed({**props, **extra}, required + needs)}
        for shape, (props, required) in shapes.items()
        for rule, extra, needs in _rules(service)
    ]
    names = service.clf.label_names
    if names is None:
        result = _closed({"value": {"type": "number"}, "exit_layer": _layer(service)}, ["value", "exit_layer"])
    else:
        probability = {"type": "number", "minimum": 0, "maximum": 1}
        probabilities = _closed({n: probability for n in names}, list(names))
        label = {"type": "string", "enum": list(names)}
        result = _closed({"label": label, "probabilities": probabilities, "exit_layer": _layer(service)},
                         ["label", "probabilities", "exit_layer"])  # fmt: skip
    threshold = {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}],
                 "description": "the threshold used: one number, or one per exit (the accuracy guard's)"}  # fmt: skip
    results = {"type": "array", "items": _ref("Result"), "description": "one per input, in input order"}
    criterion = {"type": "string", "enum": list(POLICIES)}
    answer = _closed({"results": results, "criterion": criterion, "threshold": threshold},
                     ["results", "criterion", "threshold"])  # fmt: skip
    error = _closed({"error": {"type": "string", "description": "one line saying what is wrong"}}, ["error"])
    status = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    retry = {"Retry-After": {"required": True, "description": "seconds to wait before trying again",
                             "schema": {"type": "integer", "minimum": 1}}}  # fmt: skip
    bounds = "; ".join(f"{n} [{lo:.6g}, {hi:.6g}]" for n, (lo, hi) in _criteria(service).items())
    description = (
        f"Classifies texts with early exit ({service.num_layers} layers). Limits: at most {cfg.max_inputs} inputs "
        f"per request, {cfg.max_text_chars} characters per text, {cfg.max_body_bytes} bytes per body (413 beyond; "
        f"JSON Schema cannot state it). Threshold bounds per criterion: "
        f"{bounds or 'none (this service runs every input to the last layer)'}. Under load a request is refused at "
        "once with 503 and Retry-After (docs/serving.md)."
    )
    predict = {
        "summary": "classify one text, one pair, or a list of inputs",
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Request")}}},
        "responses": {
            "200": _answer("per input, in input order", "Answer"),
            "400": _answer("the body is not JSON", "Error"),
            "413": _answer(f"the body is over {cfg.max_body_bytes} bytes", "Error"),
            "422": _answer("the body is JSON but not a request this schema allows", "Error"),
            "500": _answer("inference failed", "Error"),
            "503": {
                **_answer("overloaded or shutting down: try again after Retry-After seconds", "Error"),
                "headers": retry,
            },  # fmt: skip
        },
    }
    ready = {"200": _answer("the model is loaded and the service takes requests", "Status"),
             "503": _answer("shutting down", "Status")}  # fmt: skip
    prometheus = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    itself = {"description": "OpenAPI 3.0", "content": {JSON: {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "romebert early-exit classifier", "version": "1", "description": description},
        "paths": {
            "/predict": {"post": predict},
            "/health": {"get": {"summary": "liveness", "responses": {"200": _answer("alive", "Status")}}},
            "/ready": {"get": {"summary": "readiness", "responses": ready}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": prometheus}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": itself}}},
        },
        "components": {
            "schemas": {
                "Text": {"type": "string", "maxLength": cfg.max_text_chars},
                "Input": item,
                "Request": {"oneOf": branches},
                "Result": result,
                "Answer": answer,
                "Error": error,
                "Status": status,
            }  # fmt: skip
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """An object with these properties only."""
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


def _criteria(service: Any) -> dict[str, tuple[float, float]]:
    """The criteria a request may name, with their threshold bounds (none on a full-depth service)."""
    if service.full_depth:
        return {}
    regression = service.clf.segments.regression
    return {n: b for n, b in service.bounds().items() if POLICIES[n].supports_regression or not regression}


def _rules(service: Any) -> list[tuple[str, dict, list[str]]]:
    """(title, properties, required) of each way a request may choose its exit rule."""
    rules: list[tuple[str, dict, list[str]]] = [("the service's exit rule", {}, [])]
    criteria = _criteria(service)
    if not criteria:
        return rules
    own = service.policy.name
    lo, hi = criteria[own]
    rules.append((f"a threshold for {own}", {"threshold": _bounded(lo, hi)}, ["threshold"]))
    for name, (lo, hi) in criteria.items():
        rule = {"criterion": {"type": "string", "enum": [name], "description": POLICIES[name].rule},
                "threshold": _bounded(lo, hi)}  # fmt: skip
        rules.append((f"{name} with a threshold", rule, ["criterion", "threshold"]))
    rules.append((f"{own} at the service's threshold", {"criterion": {"type": "string", "enum": [own]}}, ["criterion"]))
    return rules


def _bounded(lo: float, hi: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _layer(service: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": service.num_layers}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
