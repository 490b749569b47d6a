"""The codec server: Temporal's remote codec protocol on the gateway, for operators.

The Temporal UI (or `temporal --codec-endpoint <gateway>/codec`) posts a history's payloads, as
Temporal's Payloads JSON, to `/codec/decode` and gets them back decrypted; `/codec/encode` does
the reverse (a signal's input typed in the UI, say). Operators only. The UI calls from its own
origin, so these routes, and only these, answer CORS for the configured UI origins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Security, status
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payloads

from services.api.auth import AUTH_RESPONSES, current_actor
from services.api.errors import Responses, documented_error
from shared.codec import EncryptionCodec, PayloadKeysError, UndecryptablePayload, payload_keyring
from shared.contracts import Actor, Role
from shared.settings import Settings

PREFIX = "/codec"
# what the UI sends: its JSON, the namespace, and (with an OIDC-enabled UI) the operator's token
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Namespace"]
PREFLIGHT_CACHE_SECONDS = 600
MAX_PAYLOADS = 1000

router = APIRouter(prefix=PREFIX, tags=["codec"])


class CodecPayload(BaseModel):
    """A `temporal.api.common.v1.Payload` in proto3 JSON: its bytes in base64."""

    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, str] = Field(default={}, description="metadata values, base64")
    data: str = Field(default="", description="the payload's bytes, base64")


class CodecPayloads(BaseModel):
    payloads: list[CodecPayload] = Field(max_length=MAX_PAYLOADS)


def payload_codec(request: Request) -> EncryptionCodec:
    """The gateway's keys, read at each call, so a rotated keys file needs no restart here."""
    settings: Settings = request.app.state.settings
    try:
        return EncryptionCodec(payload_keyring(settings))
    except PayloadKeysError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(error)) from None


Operator = Annotated[Actor, Security(current_actor, scopes=[Role.OPERATOR.value])]
Codec = Annotated[EncryptionCodec, Depends(payload_codec)]

RESPONSES: Responses = {
    **AUTH_RESPONSES,
    status.HTTP_422_UNPROCESSABLE_CONTENT: documented_error(
        "The body is not Temporal's Payloads JSON, or a payload cannot be decrypted (its key is not "
        "in the keyring, or it was altered)."
    ),
    status.HTTP_503_SERVICE_UNAVAILABLE: documented_error("The gateway has no payload keys configured."),
}


def _payloads(body: CodecPayloads) -> Payloads:
    try:
        return json_format.ParseDict(body.model_dump(), Payloads())
    except json_format.ParseError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="payload data and metadata values must be base64"
        ) from None


def _body(payloads: Payloads) -> CodecPayloads:
    return CodecPayloads.model_validate(json_format.MessageToDict(payloads))


@router.post("/decode", responses=RESPONSES, summary="Decrypt payloads (Temporal remote codec)")
async def decode(body: CodecPayloads, codec: Codec, _: Operator) -> CodecPayloads:
    """Payloads as the Temporal UI or CLI send them; answered decrypted. A payload that was never
    encrypted comes back as it is."""
    payloads = _payloads(body)
    try:
        await codec.decode_wrapper(payloads)
    except UndecryptablePayload as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(error)) from None
    return _body(payloads)


@router.post("/encode", responses=RESPONSES, summary="Encrypt payloads (Temporal remote codec)")
async def encode(body: CodecPayloads, codec: Codec, _: Operator) -> CodecPayloads:
    """Payloads to send to Temporal (a signal's input typed in the UI); answered encrypted under
    the current key."""
    payloads = _payloads(body)
    await codec.encode_wrapper(payloads)
    return _body(payloads)


class CodecCors:
    """CORS for the codec routes alone: the Temporal UI's origins may call them with credentials;
    every other route of the gateway answers no cross-origin request."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["POST"],
            allow_headers=ALLOWED_HEADERS,
            allow_credentials=True,
            max_age=PREFLIGHT_CACHE_SECONDS,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        codec_route = scope["type"] == "http" and scope["path"].startswith(PREFIX + "/")
        await (self._cors if codec_route else self._app)(scope, receive, send)
