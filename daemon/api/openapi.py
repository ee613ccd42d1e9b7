"""GET /openapi.json: an OpenAPI 3.1 document of every route, generated from the app and the validators.

Routes come from the app's URL map (so a new route is listed without an edit here); what a route's
body accepts comes from its fate table (daemon.api.params): every field it knows, with the spec
`params.check` validates it by, so a new parameter is published by the one entry that admits it,
and the schema and the check cannot drift apart. Query parameters come from the `Query` a view
declared (daemon.api.fields) and parses with.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from flask import Blueprint, Flask, current_app, jsonify

from ..services import get_services
from .fields import Query, nullable
from .params import HONOURED, IGNORED, Field

bp = Blueprint("openapi", __name__)
OPENAPI_VERSION = "3.1.0"
_ERROR = {"$ref": "#/components/schemas/Error"}
_PATH_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


@dataclass(frozen=True)
class RouteDoc:
    """What a view declared: its body's fate table and required fields, query, success status and
    content types."""

    table: Mapping[str, Field] | None = None
    required: tuple[str, ...] = ()
    query: Query | None = None
    status: int = 200
    produces: tuple[str, ...] = ("application/json",)
    auth: str | None = None  # "api_key" | "admin_key" | "metrics_key" | None (public)


ROUTES: dict[Callable, RouteDoc] = {}


def documented(**kwargs) -> Callable[[Callable], Callable]:
    """Declare a view's request shape (RouteDoc's fields) for the OpenAPI document."""
    def mark(view: Callable) -> Callable:
        ROUTES[view] = RouteDoc(**kwargs)
        return view
    return mark


def _error_schema() -> dict:
    text_or_null = {"type": ["string", "null"]}
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": text_or_null, "code": text_or_null}}}}


def field_schema(field: Field, cfg) -> dict:
    """One body field: its spec's schema (anything, when it has none), described by its note.
    A refused field admits null only, or the harmless value its spec names (n: 1)."""
    if field.spec is not None:
        out = field.spec.described(cfg)
    else:
        out = {} if field.fate != "refused" else {"type": "null"}
    note = field.note if field.fate == HONOURED else f"{field.fate}: {field.note}"
    return {**out, "description": note}


def body_schema(table: Mapping[str, Field], required: tuple[str, ...], cfg) -> dict:
    """A route's JSON body: every field of its table (null meaning absent), nothing else."""
    props = {name: field_schema(f, cfg) if name in required else nullable(field_schema(f, cfg))
             for name, f in table.items()}
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    ignored = sorted(name for name, f in table.items() if f.fate == IGNORED)
    if ignored:
        out["description"] = "Accepted and ignored: " + ", ".join(ignored) + "."
    return out


def _operation(app: Flask, rule, method: str, cfg) -> dict:
    view = app.view_functions[rule.endpoint]
    doc = ROUTES.get(view, RouteDoc())
    summary = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
    op: dict = {"operationId": f"{rule.endpoint}.{method.lower()}".replace(".", "_"),
                "summary": summary, "responses": {}}
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in _PATH_PARAM.findall(rule.rule)]
    if doc.query is not None:
        params += [{"name": name, "in": "query", "required": False, "schema": spec.described(cfg)}
                   for name, spec in doc.query.fields.items()]
    if params:
        op["parameters"] = params
    if doc.table is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": body_schema(doc.table, doc.required, cfg)}}}
    success = {"description": "success"}
    if doc.status != 204:
        success["content"] = {kind: {} for kind in doc.produces}
    op["responses"][str(doc.status)] = success
    op["responses"]["default"] = {"description": "an error, in OpenAI's shape",
                                  "content": {"application/json": {"schema": _ERROR}}}
    if doc.auth:
        op["security"] = [{doc.auth: []}]
    return op


def document(app: Flask) -> dict:
    """The OpenAPI 3.1 document of `app` as configured (caps such as max_new_tokens filled in)."""
    cfg = get_services(app).config
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        path = _PATH_PARAM.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(app, rule, method, cfg)
    bearer = {"type": "http", "scheme": "bearer"}
    return {"openapi": OPENAPI_VERSION,
            "info": {"title": "edgechat", "version": _version(),
                     "description": "Chat inference daemon for small edge devices."},
            "paths": paths,
            "components": {"schemas": {"Error": _error_schema()},
                           "securitySchemes": {"api_key": bearer, "admin_key": bearer,
                                               "metrics_key": bearer}}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("edgechat")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


@bp.get("/openapi.json")
def openapi():
    """This API as an OpenAPI 3.1 document."""
    return jsonify(document(current_app))
