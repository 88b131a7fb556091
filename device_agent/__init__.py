"""edgefleet device agent: verified model slots, inference, local summaries, durable outbox."""

from .errors import AgentError, InferenceError, InputError, ModelLoadError
from .runtime import LiteRtRuntime, OnnxRuntime, Runtime, open_runtime

__all__ = ["AgentError", "InferenceError", "InputError", "LiteRtRuntime", "ModelLoadError", "OnnxRuntime",
           "Runtime", "open_runtime"]
