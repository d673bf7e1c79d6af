"""A session's state over HTTP: export (GET), import (PUT) and fork (POST) (README, "Session state").

The document is binary (``application/octet-stream``, the safetensors file of ``service.sessions.document``),
so these routes read and answer raw bytes, and describe them in the OpenAPI schema themselves. ``ETag`` on
every answer; ``If-Match`` / ``If-None-Match`` on an import make it a compare-and-set (412); ``If-None-Match``
on an export answers 304 without the document while the session is at one of its tags.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel

from service.api.bodies import parse
from service.api.deps import served_model
from service.api.openapi import body_schema, problem_responses
from service.api.preconditions import entity_tags, header_parameter
from service.api.v1 import SessionIdPath, describe, per_model
from service.auth import TenantDep
from service.config import Settings
from service.problems import Problem
from service.schemas import ForkRequest, SessionInfo
from service.session_state import Precondition, SessionStates, Written
from service.sessions.base import session_key
from service.sessions.document import DocumentError, built_by, decode, encode

router = APIRouter(prefix="/v1", tags=["v1"])
OCTET = "application/octet-stream"
RAW_BODY_MODELS: list[type[BaseModel]] = [ForkRequest]
_BINARY = {OCTET: {"schema": {"type": "string", "format": "binary"}}}
_ETAG = {"ETag": {"description": "Changes whenever the session does; send it as If-Match to import only"
                  " over this very state", "schema": {"type": "string"}}}


async def get_states(request: Request) -> SessionStates:
    settings: Settings = request.app.state.settings
    budgets = [settings.max_answer_bytes, settings.tenant_max_answer_bytes] if settings.store == "memory" else []
    return SessionStates(served_model(request), min((b for b in budgets if b is not None), default=None))


StatesDep = Annotated[SessionStates, Depends(get_states)]


def _answer(response: Response, request: Request, session_id: str, written: Written, states: SessionStates,
            ) -> SessionInfo:
    response.headers["ETag"] = written.tag
    response.status_code = 201 if written.created else 200
    if written.created:  # under /v1/models/{model}/..., that model's session (the same id is another's at /v1)
        scope = {"model": request.path_params["model"]} if "model" in request.path_params else {}
        response.headers["Location"] = str(request.url_for("get_session", **scope, session_id=session_id))
    return describe(states.model, session_id, written.session, written.session.updated_at + states.store.ttl_seconds)


_IF_MATCH_DOC = "Import only over the session at one of these entity tags (412 otherwise); `*`: only if it exists"
_IF_NONE_MATCH_DOC = "`*`: import only if the session does not exist (412 otherwise)"
_UNLESS_AT_DOC = "A 304 without the document while the session is at one of these entity tags (`*`: at any)"


@router.get(
    "/sessions/{session_id}/state", response_class=Response, summary="Export a session's state",
    description="The session as one safetensors document: its state vector, position, model version and"
                " the answer kept for an exact retry. `PUT` it here or on another deployment to go on exactly.",
    responses={200: {"description": "The state document", "content": _BINARY, "headers": _ETAG},
               304: {"description": "Not modified: the session is at a tag `If-None-Match` lists", "headers": _ETAG},
               **problem_responses(400, 404, 409, 422, 503)},
    openapi_extra={"parameters": [header_parameter("if-none-match", _UNLESS_AT_DOC)]},
)
async def export_state(
    session_id: SessionIdPath, states: StatesDep, tenant: TenantDep,
    if_none_match: Annotated[list[str] | None, Header(include_in_schema=False)] = None,  # every field line
) -> Response:
    unless = entity_tags(if_none_match, "If-None-Match", weak=True)  # a malformed list is a 400 before any work
    document = await states.export(session_key(tenant, session_id))
    tag = document.tag()
    if unless is not None and not Precondition(if_none_match=unless).holds(tag):  # weak comparison, RFC 9110 13.1.2
        return Response(status_code=304, headers={"ETag": tag})
    return Response(encode(document), media_type=OCTET, headers={"ETag": tag})


@router.put(
    "/sessions/{session_id}/state", response_model=SessionInfo, summary="Import a session's state",
    description="Creates (201) or replaces (200) the session with an exported document. A document of another"
                " model version is a 409 `model-changed`; a damaged one a 422 `invalid-state`. Either way"
                " nothing is changed.",
    openapi_extra={"requestBody": {"required": True, "content": _BINARY},
                   "parameters": [header_parameter("if-match", _IF_MATCH_DOC),
                                  header_parameter("if-none-match", _IF_NONE_MATCH_DOC)]},
    responses={200: {"description": "Replaced", "headers": _ETAG},
               201: {"description": "Created", "model": SessionInfo, "headers": _ETAG},
               **problem_responses(400, 408, 409, 412, 413, 422, 429, 503)},
)
async def import_state(
    session_id: SessionIdPath, request: Request, response: Response, states: StatesDep, tenant: TenantDep,
    if_match: Annotated[list[str] | None, Header(include_in_schema=False)] = None,  # every field line
    if_none_match: Annotated[list[str] | None, Header(include_in_schema=False)] = None,
) -> SessionInfo:
    precondition = Precondition(entity_tags(if_match, "If-Match", weak=False),
                                entity_tags(if_none_match, "If-None-Match", weak=True))
    raw = await request.body()
    if (version := built_by(raw)) is not None:  # another model's document: 409 before its sizes are judged
        states.require_loaded(session_key(tenant, session_id), version)
    try:
        document = decode(raw, states.state_size, states.max_answer_bytes)
        states.check(document)
    except DocumentError as exc:
        raise Problem(422, "invalid-state", f"not an importable state document: {exc}; nothing was changed"
                      ) from None
    written = await states.put(session_key(tenant, session_id), document, precondition)
    return _answer(response, request, session_id, written, states)


@router.post(
    "/sessions/{session_id}/fork", response_model=SessionInfo, status_code=201,
    summary="Copy a session to a new id; the two then live independently",
    openapi_extra=body_schema(ForkRequest),
    responses={201: {"description": "Created", "headers": _ETAG}, **problem_responses(400, 404, 409, 413, 422, 503)},
)
async def fork_session(
    session_id: SessionIdPath, request: Request, response: Response, states: StatesDep, tenant: TenantDep
) -> SessionInfo:
    body = parse(await request.body(), ForkRequest)
    written = await states.fork(session_key(tenant, session_id), session_key(tenant, body.to))
    return _answer(response, request, body.to, written, states)


model_router = per_model(router)
