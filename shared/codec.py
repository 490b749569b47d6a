"""Temporal payloads, failure texts included, encrypted (AES-256-GCM) before they leave the process.
Each is sealed under the keyring's first key, whose id travels in its metadata: after a rotation, a
payload sealed under an older key opens while that key stays in the keyring."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

from shared.connection_security import create_private_file

if TYPE_CHECKING:
    from shared.settings import Settings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEYS_VARIABLE = "ORDERFLOW_PAYLOAD_KEYS"
KEYS_FILE_VARIABLE = "ORDERFLOW_PAYLOAD_KEYS_FILE"


class PayloadKeysError(ValueError):
    """The payload keys are missing or malformed; the message names the setting, not a key."""


class UndecryptablePayload(ValueError):
    """A payload that cannot be opened: its key is not in the keyring, or it was altered."""


PayloadKeyring = Mapping[str, AESGCM]
"""Ciphers by key id, in order: the first encrypts, every one decrypts."""


def parse_key_entries(entries: Iterator[tuple[str, str]]) -> dict[str, AESGCM]:
    """`(where, "id:base64")` pairs to ciphers; `where` says where an entry came from, for errors."""
    ciphers: dict[str, AESGCM] = {}
    for where, entry in entries:
        key_id, _, encoded = entry.strip().partition(":")
        if not KEY_ID.fullmatch(key_id):
            raise PayloadKeysError(f"{where}: expected `id:base64-of-32-bytes`, an id of 1-64 [A-Za-z0-9._-]")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            key = b""
        if len(key) != KEY_BYTES:
            raise PayloadKeysError(f"{where}: key {key_id!r} is not {KEY_BYTES} bytes in base64")
        if key_id in ciphers:
            raise PayloadKeysError(f"{where}: key id {key_id!r} appears twice")
        ciphers[key_id] = AESGCM(key)
    return ciphers


def _entries(settings: Settings) -> Iterator[tuple[str, str]]:
    listed = settings.payload_keys.get_secret_value()
    for number, entry in enumerate(listed.split(","), start=1):
        if entry.strip():
            yield f"{KEYS_VARIABLE}: entry {number}", entry
    if settings.payload_keys_file is not None:
        path = settings.payload_keys_file
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise PayloadKeysError(f"{KEYS_FILE_VARIABLE}: cannot read {path}: {error.strerror}") from None
        for number, line in enumerate(lines, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield f"{KEYS_FILE_VARIABLE}: line {number} of {path}", line


def payload_keyring(settings: Settings) -> PayloadKeyring:
    """The keys of `payload_keys` then `payload_keys_file`; an error names where, never a key."""
    keyring = parse_key_entries(_entries(settings))
    if not keyring:
        raise PayloadKeysError(
            f"no payload encryption key: set {KEYS_VARIABLE} or {KEYS_FILE_VARIABLE} "
            "(`make run` creates .run/payload-keys)"
        )
    return keyring


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over each whole payload; unencrypted ones pass on decode, so older histories replay."""

    def __init__(self, keyring: PayloadKeyring) -> None:
        self._keyring = keyring
        self._current = next(iter(keyring))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id, nonce = self._current, os.urandom(NONCE_BYTES)
        # the key id as associated data: a payload relabelled with another key id does not open
        sealed = self._keyring[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode()}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._keyring.get(key_id)
        if cipher is None:
            raise UndecryptablePayload(f"payload encrypted with key {key_id!r}, which is not in the keyring")
        try:
            plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise UndecryptablePayload(f"payload under key {key_id!r} was altered or is corrupt") from None
        return Payload.FromString(plain)


def encrypted_data_converter(keyring: PayloadKeyring) -> DataConverter:
    """Pydantic models as JSON, every payload encrypted, failure texts moved into encrypted payloads."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keyring),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def ensure_keys_file(path: Path, key_id: str) -> None:
    """Create `path` holding one new key (a line `id:base64`), unless it exists."""
    if not path.exists():
        create_private_file(path, f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}\n".encode())
