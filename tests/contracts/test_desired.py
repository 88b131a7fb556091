"""The device's decision on desired-state commands: forged, replayed, expired, misaddressed all refused."""

from datetime import UTC, datetime, timedelta

import pytest

from edgefleet_contracts.desired import Desired, WrongDeviceError, accept_desired, sign_desired
from edgefleet_contracts.errors import ExpiredError, RollbackError, SchemaError, TamperedError, UntrustedKeyError
from edgefleet_contracts.signing import generate_key

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
FLEET = generate_key()


def _d(**over) -> Desired:
    kw = dict(device_id="dev-1", seq=5, name="clinical", version="1.1.0", url="http://127.0.0.1:8480/packages/x",
              sha256="a" * 64, length=1000, issued=NOW, expires=NOW + timedelta(hours=1))
    kw.update(over)
    return Desired(**kw)  # type: ignore[arg-type]


def test_good_command_is_accepted():
    d = accept_desired(sign_desired(_d(), FLEET), FLEET.public_key(), device_id="dev-1", last_seq=4, now=NOW)
    assert (d.name, d.version, d.seq) == ("clinical", "1.1.0", 5)


@pytest.mark.parametrize(
    ("envelope", "error", "message"),
    [
        (lambda: sign_desired(_d(), generate_key()), UntrustedKeyError, "not trusted"),
        (lambda: {**sign_desired(_d(), FLEET), "signed": {**_d(version="9.0.0").to_signed()}}, TamperedError,
         "does not verify"),
        (lambda: sign_desired(_d(seq=4), FLEET), RollbackError, "not newer than 4"),
        (lambda: sign_desired(_d(expires=NOW - timedelta(seconds=1)), FLEET), ExpiredError, "expired"),
        (lambda: sign_desired(_d(device_id="dev-2"), FLEET), WrongDeviceError, "addressed to 'dev-2'"),
        (lambda: sign_desired(_d(url="file:///etc/passwd"), FLEET), SchemaError, "http"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(envelope, error, message):
    with pytest.raises(error, match=message):
        accept_desired(envelope(), FLEET.public_key(), device_id="dev-1", last_seq=4, now=NOW)
