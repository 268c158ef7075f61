"""llavakit: LLaVA, LLaVA-NeXT and LLaVA-OneVision from Hugging Face checkpoints, in plain PyTorch."""

from .api import VLM, ChatOutput, load
from .processing.processor import Batch
from .engine.sampling import SamplingParams
from .errors import (
    ConfigError,
    GenerationError,
    ImageError,
    LlavakitError,
    PromptError,
    TokenFeatureMismatch,
    VideoError,
    WeightsError,
)

__version__ = "0.1.0"

__all__ = [
    "load", "VLM", "ChatOutput", "Batch", "SamplingParams", "LlavakitError", "ConfigError", "WeightsError",
    "ImageError", "VideoError", "PromptError", "TokenFeatureMismatch", "GenerationError", "__version__",
]
