"""edgefleet wire contracts: every document that crosses a process boundary, defined once.

Imports nothing heavy (no numpy, no runtimes): device, server and packager all depend on it.
"""

from .archive import VerifiedPackage, open_package
from .canonical import canonical_bytes, parse_json
from .digest import sha256_file, sha256_file_with_length
from .errors import (
    ContractError,
    ExpiredError,
    FileMismatchError,
    PackageError,
    RevokedKeyError,
    RollbackError,
    SchemaError,
    SignatureError,
    TamperedError,
    TargetMismatchError,
    UnsafeArchiveError,
    UnsignedError,
    UntrustedKeyError,
)
from .keyset import DelegatedKey, Keyset
from .manifest import (
    KEYSET_NAME,
    MANIFEST_NAME,
    FeatureSpec,
    FileEntry,
    ImageSpec,
    InputSpec,
    Manifest,
    OutputSpec,
)
from .tags import check_tag, parse_tag
from .trust import check_target, verify_keyset, verify_manifest
from .versions import is_newer, parse_version

__all__ = [
    "KEYSET_NAME",
    "MANIFEST_NAME",
    "ContractError",
    "DelegatedKey",
    "ExpiredError",
    "FeatureSpec",
    "FileEntry",
    "FileMismatchError",
    "ImageSpec",
    "InputSpec",
    "Keyset",
    "Manifest",
    "OutputSpec",
    "PackageError",
    "RevokedKeyError",
    "RollbackError",
    "SchemaError",
    "SignatureError",
    "TamperedError",
    "TargetMismatchError",
    "UnsafeArchiveError",
    "UnsignedError",
    "UntrustedKeyError",
    "VerifiedPackage",
    "canonical_bytes",
    "check_tag",
    "check_target",
    "is_newer",
    "open_package",
    "parse_json",
    "parse_tag",
    "parse_version",
    "sha256_file",
    "sha256_file_with_length",
    "verify_keyset",
    "verify_manifest",
]
