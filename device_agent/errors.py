"""Agent errors: one root, names ending in Error, messages that say what to do."""


class AgentError(Exception):
    """Root of every error the device agent raises on purpose."""

    reason = "agent"


class ModelLoadError(AgentError):
    """The model file cannot be loaded by the runtime it declares."""

    reason = "model_load"


class InferenceError(AgentError):
    """The runtime failed while running a valid input."""

    reason = "inference"


class InputError(AgentError):
    """A request does not match the package's input schema (shape, dtype, NaN, range, names)."""

    reason = "invalid_input"

    def __init__(self, message: str, *, kind: str = "invalid_input", feature: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.feature = feature


class NoModelError(AgentError):
    """The device has no installed model yet (install one with `device-agent install`)."""

    reason = "no_model"


class FeedbackError(AgentError):
    """Label feedback for an unknown or malformed prediction id, an unknown class, or a prediction already
    labelled."""

    reason = "feedback"
