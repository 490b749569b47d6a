"""The tests' payload key: every Temporal client, worker and replay of the tests encrypts payloads
as production does, with this fixed key, so recorded histories (sealed under it) replay."""

from __future__ import annotations

import base64

from pydantic import SecretStr

from shared.codec import encrypted_data_converter, payload_keyring
from shared.settings import Settings

TEST_PAYLOAD_KEYS = SecretStr("test-1:" + base64.b64encode(bytes(range(32))).decode())
TEST_DATA_CONVERTER = encrypted_data_converter(
    payload_keyring(Settings.model_construct(payload_keys=TEST_PAYLOAD_KEYS))
)
