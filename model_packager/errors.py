"""Packager errors. Verification failures are the contract errors themselves (re-exported here)."""

from edgefleet_contracts.errors import ContractError


class PackagerError(Exception):
    """Root of errors raised while building packages or managing keys (bad input data, bad model, bad flags)."""


class KeysError(PackagerError):
    """A key folder is missing, incomplete, or would be overwritten."""


class DataError(PackagerError):
    """Calibration or holdout data cannot be read or does not fit the model."""


class ModelError(PackagerError):
    """The model file cannot be loaded or has an unsupported interface."""


class QuantizationError(PackagerError):
    """No quantization candidate could be produced or none meets the accuracy bound."""


class FlagError(PackagerError):
    """A flag (a ``BuildRequest`` field) has a value the package format or the build does not allow; the message
    names the flag. Raised before any work."""


class OutputExistsError(PackagerError):
    """The output file already exists and replacing it was not asked for (``--force``)."""


class OutputError(PackagerError):
    """The output file cannot be written (read-only folder, disk full, ...); the message names the --out path."""


class InputFileError(PackagerError):
    """A file named on the command line (package, root key, keyset) does not exist or is not a file."""


__all__ = ["ContractError", "DataError", "FlagError", "InputFileError", "KeysError", "ModelError", "OutputError",
           "OutputExistsError", "PackagerError", "QuantizationError"]
