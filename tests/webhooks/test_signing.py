"""Signatures per the Standard Webhooks spec, checked against its published test vector."""

from __future__ import annotations

import pytest

from services.webhooks.signing import InvalidSignature, new_secret, sign, verify

# The spec's example (standard-webhooks/standard-webhooks README and library tests).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _headers(signature: str = EXPECTED, timestamp: int = TIMESTAMP) -> dict[str, str]:
    return {"webhook-id": MSG_ID, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature}


def test_sign_matches_the_spec_test_vector() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == EXPECTED


def test_verify_accepts_the_spec_test_vector_among_several_signatures() -> None:
    verify(SECRET, _headers(), BODY, now=lambda: TIMESTAMP)
    rotated = f"v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {EXPECTED}"
    verify(SECRET, {k.upper(): v for k, v in _headers(rotated).items()}, BODY,
           now=lambda: TIMESTAMP + 299)


@pytest.mark.parametrize(("headers", "body", "now", "reason"), [
    (_headers(), b'{"test": 2432232315}', TIMESTAMP, "no matching signature"),
    (_headers(timestamp=TIMESTAMP + 1), BODY, TIMESTAMP, "no matching signature"),
    (_headers(), BODY, TIMESTAMP + 301, "too old"),
    (_headers(), BODY, TIMESTAMP - 301, "future"),
    (_headers("v2," + EXPECTED[3:]), BODY, TIMESTAMP, "no matching signature"),
    ({"webhook-id": MSG_ID}, BODY, TIMESTAMP, "missing"),
])
def test_verify_refuses_tampered_stale_or_incomplete_messages(
    headers: dict[str, str], body: bytes, now: int, reason: str
) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        verify(SECRET, headers, body, now=lambda: now)


def test_new_secrets_are_whsec_24_bytes_and_distinct() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(first.removeprefix("whsec_")) == 32  # base64 of 24 bytes
    signature = sign(first, MSG_ID, TIMESTAMP, BODY)
    verify(first, _headers(signature), BODY, now=lambda: TIMESTAMP)
    with pytest.raises(InvalidSignature):
        verify(second, _headers(signature), BODY, now=lambda: TIMESTAMP)
