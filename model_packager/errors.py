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


__all__ = ["ContractError", "DataError", "KeysError", "ModelError", "PackagerError", "QuantizationError"]
