"""One root for every contract error: a document that crosses a boundary and is not what it claims.

Every class name ends in ``Error``; messages say what failed and what to do. Callers that need the reason as
a short machine-readable token (counters, quarantine tables) use ``err.reason``.
"""


class ContractError(Exception):
    """A document (manifest, keyset, summary, command, package) fails a contract check."""

    reason = "contract"


class SchemaError(ContractError):
    """A document does not have the fields, types or values its contract requires."""

    reason = "schema"


class SignatureError(ContractError):
    """A signature problem: see the subclasses."""

    reason = "signature"


class UnsignedError(SignatureError):
    """The document carries no signature at all."""

    reason = "unsigned"


class UntrustedKeyError(SignatureError):
    """Signed, but by no key the verifier trusts."""

    reason = "untrusted_key"


class RevokedKeyError(SignatureError):
    """Signed by a key that the current keyset revokes."""

    reason = "revoked_key"


class TamperedError(SignatureError):
    """A trusted key's signature does not verify: the document changed after signing."""

    reason = "bad_signature"


class ExpiredError(ContractError):
    """A key, keyset, package or command is past its expiry."""

    reason = "expired"


class RollbackError(ContractError):
    """An older keyset, version or sequence than one already accepted (replay or downgrade)."""

    reason = "rollback"


class PackageError(ContractError):
    """A package archive problem: see the subclasses."""

    reason = "package"


class FileMismatchError(PackageError):
    """A file's hash or length differs from the manifest, or files are missing or extra."""

    reason = "file_mismatch"


class UnsafeArchiveError(PackageError):
    """The archive holds absolute paths, ``..``, links, devices or duplicate names."""

    reason = "unsafe_archive"


class TargetMismatchError(PackageError):
    """The package was built for another hardware target."""

    reason = "wrong_target"
