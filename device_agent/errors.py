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
    """A label that cannot be recorded: the root of the feedback errors below, each with its own ``reason``.

    None of them records or counts the label. The HTTP API maps each subclass to a status code in one table
    (``http_api._FEEDBACK_STATUS``): a client can tell "drop this label" (404, 409, 422) from "send it again
    later" (503).
    """

    reason = "feedback"


class MalformedPredictionIdError(FeedbackError):
    """The prediction id is not of the form ``<boot>-<counter>`` a prediction returns, so it cannot name any
    prediction: a bug in the client that sent it (a truncated or altered id, another field sent as the id)."""

    reason = "malformed_prediction_id"


class UnknownPredictionError(FeedbackError):
    """A well-formed prediction id this device's log does not hold: never made here, or rotated out."""

    reason = "unknown_prediction"


class UnknownClassError(FeedbackError):
    """The label names no class of the model that made the prediction (a class name not in its list, or a
    class index outside 0..n-1)."""

    reason = "unknown_class"


class AlreadyLabelledError(FeedbackError):
    """The prediction already has a label (from this run or an earlier one); a prediction is labelled once."""

    reason = "already_labelled"


class FeedbackUnavailableError(FeedbackError):
    """The agent cannot take labels now: no model is installed, or it runs without a prediction log."""

    reason = "feedback_unavailable"


class LabelWriteError(AgentError):
    """A label could not be made durable (``labels.jsonl`` not written or not fsynced: a full or failing disk).

    Nothing was recorded or counted; the same label can be sent again. Not a FeedbackError: the label itself
    is fine, and a caller that drops labels on FeedbackError must not drop this one.
    """

    reason = "label_not_saved"
