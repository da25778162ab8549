"""Payload encryption, in the codec model of Temporal: payloads and results are sealed with AES-GCM where
they enter the platform (the api for a submitted task's payload, the agent SDK for a result or a
delegated payload) and opened only where they are used (the SDK, for the handler; the api, for a reader).
Every service between passes the ciphertext along, parents' results to children included, so RabbitMQ and
the state store hold only ciphertext.

SWITCHBOARD_PAYLOAD_KEYS is `id:base64key[,id:base64key...]` (keys of 16, 24 or 32 bytes): the first
seals, every one opens. Rotation: add a new key in front, deploy, then `switchboard keys reencrypt`
moves stored records to it; the old key can go once nothing is sealed with it. A sealed value is
{"$sealed": {"kid": id, "nonce": base64, "data": base64}}; opening one whose key is not here is an
UnknownKey error that names the key, never garbage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MARK = "$sealed"
_AAD = b"switchboard/payload/v1"


class CodecError(ValueError):
    """A key setting that cannot be used, or a sealed value that cannot be opened here."""


class UnknownKey(CodecError):
    pass


def parse_keys(setting: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in setting.split(","))):
        kid, sep, encoded = item.partition(":")
        if not sep or not kid:
            raise CodecError("SWITCHBOARD_PAYLOAD_KEYS: each key is id:base64 (e.g. k1:" + "A" * 43 + "=)")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=False)
        except (binascii.Error, ValueError):
            raise CodecError(f"SWITCHBOARD_PAYLOAD_KEYS: key {kid!r} is not base64") from None
        if len(key) not in (16, 24, 32):
            raise CodecError(f"SWITCHBOARD_PAYLOAD_KEYS: key {kid!r} is {len(key)} bytes, not 16, 24 or 32")
        if kid in keys:
            raise CodecError(f"SWITCHBOARD_PAYLOAD_KEYS: key {kid!r} is named twice")
        keys[kid] = key
    return keys


def new_key() -> str:
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARK), dict)


class Codec:
    """Seals and opens with the keys of SWITCHBOARD_PAYLOAD_KEYS. Without keys it seals nothing, and
    refuses to open what is sealed (a handler must not get ciphertext as if it were its payload)."""

    def __init__(self, keys: dict[str, bytes]):
        self.current = next(iter(keys), None)
        self._keys = dict(keys)
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}

    @classmethod
    def from_setting(cls, setting: str) -> Codec:
        return cls(parse_keys(setting))

    @property
    def enabled(self) -> bool:
        return self.current is not None

    def seal(self, value: Any, *, context: str | None = None) -> Any:
        """The value, sealed with the current key (a sealed one is left as it is; without keys, the value).

        With `context` (an idempotency key) the nonce is derived from the context and the plain value, so
        the same value sealed again for the same context gives the same ciphertext, which a retried
        submission must; a different value gives a different nonce, so no nonce is ever reused."""
        if self.current is None or is_sealed(value):
            return value
        plain = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if context is None:
            nonce = os.urandom(12)
        else:
            nonce = hmac.new(self._keys[self.current], context.encode() + b"\0" + plain, hashlib.sha256).digest()[:12]
        data = self._ciphers[self.current].encrypt(nonce, plain, _AAD)
        return {MARK: {"kid": self.current, "nonce": base64.b64encode(nonce).decode(),
                       "data": base64.b64encode(data).decode()}}

    def open(self, value: Any) -> Any:
        """The plain value of a sealed one; anything else as it is (data from before keys were set)."""
        if not is_sealed(value):
            return value
        sealed = value[MARK]
        cipher = self._ciphers.get(sealed.get("kid"))
        if cipher is None:
            have = ", ".join(map(repr, self._ciphers)) or "none"
            raise UnknownKey(f"sealed with key {sealed.get('kid')!r}, which is not in this process's "
                             f"SWITCHBOARD_PAYLOAD_KEYS (it has {have})")
        try:
            plain = cipher.decrypt(base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["data"]), _AAD)
        except (InvalidTag, KeyError, ValueError, binascii.Error):
            raise CodecError(f"a value sealed with key {sealed.get('kid')!r} does not open: altered or truncated") from None
        return orjson.loads(plain)

    def reseal(self, value: Any) -> Any:
        """A value sealed with an older key, sealed again with the current one; anything else unchanged."""
        if self.current is not None and is_sealed(value) and value[MARK].get("kid") != self.current:
            return self.seal(self.open(value))
        return value

    def open_each(self, values: dict | None) -> dict | None:
        """Opens each value of a mapping (a workflow's results by task, a task's inputs by parent)."""
        return None if values is None else {k: self.open(v) for k, v in values.items()}
