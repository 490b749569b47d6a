"""Temporal's remote codec for operators' Temporal UI or CLI: `/codec/decode` and `/codec/encode`, the
only routes answering CORS, and `/codec/session`, a cookie holding an operator's token for a UI without
a sign-in of its own, which decode and encode (they change nothing), and no other route, accept."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Depends, HTTPException, Request, Response, Security, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, SecurityScopes
from google.protobuf import json_format
from pydantic import BaseModel, Field
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payloads

from services.api.auth import AUTH_RESPONSES, TokenVerifier, bearer_token, current_actor, get_verifier
from services.api.errors import Responses, documented_error
from services.api.limits import BODY_LIMIT_RESPONSES
from shared.codec import EncryptionCodec, PayloadKeysError, UndecryptablePayload, payload_keyring
from shared.contracts import Actor, Role

PREFIX = "/codec"
# what the UI sends: its JSON, the namespace, and (with an OIDC-enabled UI) the operator's token
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Namespace"]
PREFLIGHT_CACHE_SECONDS = 600
MAX_PAYLOADS = 1000
SESSION_COOKIE = "orderflow_codec"
# base64, standard or URL-safe, padded or not: what protobuf's JSON takes for bytes
BASE64 = r"^(?:[A-Za-z0-9+/_-]{4})*(?:[A-Za-z0-9+/_-]{2}(?:==)?|[A-Za-z0-9+/_-]{3}=?)?$"
Base64 = Annotated[str, Field(pattern=BASE64)]

router = APIRouter(prefix=PREFIX, tags=["codec"])


class CodecPayload(BaseModel):
    """A `temporal.api.common.v1.Payload` in proto3 JSON: its bytes in base64."""

    metadata: dict[str, Base64] = Field(default={}, description="metadata values, base64")
    data: Base64 = Field(default="", description="the payload's bytes, base64")


class CodecPayloads(BaseModel):
    payloads: list[CodecPayload] = Field(max_length=MAX_PAYLOADS)


def payload_codec(request: Request) -> EncryptionCodec:
    """The gateway's keys, read at each call, so a rotated keys file needs no restart here."""
    try:
        return EncryptionCodec(payload_keyring(request.app.state.settings))
    except PayloadKeysError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(error)) from None


session_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,  # the bearer token will do as well; `codec_caller` answers when neither came
    scheme_name="codecSession",
    description="An operator's bearer token in the cookie `POST /codec/session` sets, for a Temporal "
    "UI that sends cookies (*Include cross-origin credentials*) but no token. Read by "
    "`/codec/decode` and `/codec/encode` only.",
)


async def codec_caller(
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)],
    session: Annotated[str | None, Depends(session_cookie)],
    verifier: Annotated[TokenVerifier, Depends(get_verifier)],
) -> Actor:
    """The caller by its bearer token or else by the token in the codec session cookie."""
    if credentials is None and session:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=session)
    return await current_actor(security_scopes, credentials, verifier)


CodecOperator = Annotated[Actor, Security(codec_caller, scopes=[Role.OPERATOR.value])]
TokenOperator = Annotated[Actor, Security(current_actor, scopes=[Role.OPERATOR.value])]
AnyToken = Annotated[Actor, Security(current_actor)]
Codec = Annotated[EncryptionCodec, Depends(payload_codec)]

RESPONSES: Responses = {
    **AUTH_RESPONSES,
    **BODY_LIMIT_RESPONSES,
    status.HTTP_400_BAD_REQUEST: documented_error(
        "A payload cannot be decrypted (its key is not in the keyring, or it was altered), or the "
        "body cannot be read as JSON at all."
    ),
    status.HTTP_503_SERVICE_UNAVAILABLE: documented_error("The gateway has no payload keys configured."),
}


async def _coded(body: CodecPayloads, code: Callable[[Payloads], Awaitable[None]]) -> CodecPayloads:
    payloads = json_format.ParseDict(body.model_dump(), Payloads())
    try:
        await code(payloads)
    except UndecryptablePayload as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(error)) from None
    # payload by payload: a message's empty list is left out of its JSON, and `payloads` is required
    return CodecPayloads(
        payloads=[CodecPayload.model_validate(json_format.MessageToDict(one)) for one in payloads.payloads]
    )


@router.post("/decode", responses=RESPONSES, summary="Decrypt payloads (Temporal remote codec)")
async def decode(body: CodecPayloads, codec: Codec, _: CodecOperator) -> CodecPayloads:
    """Payloads as the Temporal UI or CLI send them; answered decrypted. A payload that was never
    encrypted comes back as it is."""
    return await _coded(body, codec.decode_wrapper)


@router.post("/encode", responses=RESPONSES, summary="Encrypt payloads (Temporal remote codec)")
async def encode(body: CodecPayloads, codec: Codec, _: CodecOperator) -> CodecPayloads:
    """Payloads to send to Temporal (a signal's input typed in the UI); answered encrypted under
    the current key."""
    return await _coded(body, codec.encode_wrapper)


@router.post(
    "/session",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=AUTH_RESPONSES,
    summary="Let this browser's Temporal UI decode (codec session cookie)",
)
async def open_session(
    request: Request,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)],
    _: TokenOperator,
) -> None:
    """Sets an `HttpOnly`, `SameSite=Strict` cookie for `/codec` holding the operator's token while
    it lasts, so that a Temporal UI of the same site decodes with *Include cross-origin credentials*.
    It authorizes `/codec/decode` and `/codec/encode`, nothing else."""
    assert credentials is not None  # TokenOperator verified it (else refused): its `exp` can be read as is
    token = credentials.credentials
    lifetime = int(jwt.decode(token, options={"verify_signature": False})["exp"]) - int(time.time())
    response.set_cookie(SESSION_COOKIE, token, max_age=max(lifetime, 0), **cookie_scope(request))


@router.delete(
    "/session",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={status.HTTP_401_UNAUTHORIZED: AUTH_RESPONSES[status.HTTP_401_UNAUTHORIZED]},
    summary="Forget the codec session cookie",
)
async def close_session(request: Request, response: Response, _: AnyToken) -> None:
    """Clears the cookie `POST /codec/session` set (any valid token may: signing out, or another
    user signing in on this browser)."""
    response.delete_cookie(SESSION_COOKIE, **cookie_scope(request))


def cookie_scope(request: Request) -> dict[str, Any]:
    """The session cookie's scope, as set_cookie's keywords: `/codec`, HTTPS if so, no script or site."""
    return {"path": PREFIX, "secure": request.url.scheme == "https", "httponly": True, "samesite": "strict"}


class CodecCors:
    """CORS for the codec routes alone, for the Temporal UI's origins with credentials; none elsewhere."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["POST"],  # the Temporal UI's; the session is the dashboard's (same origin)
            allow_headers=ALLOWED_HEADERS,
            allow_credentials=True,
            max_age=PREFLIGHT_CACHE_SECONDS,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        codec_route = scope["type"] == "http" and scope["path"].startswith(PREFIX + "/")
        await (self._cors if codec_route else self._app)(scope, receive, send)
