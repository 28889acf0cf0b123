"""The demo OpenAI-compatible server of ``gpusleep serve``: an embedded tiny transformer (or a local
Hugging Face model) with sleep mode. Imports torch; ``gpusleep.server`` and ``gpusleep.client`` do not."""

from .app import create_app
from .engine import Engine, Generation, HuggingFaceEngine, SamplingParams, TinyEngine
from .model import KVCache, TinyTransformer, TinyTransformerConfig
from .runtime import DemoRuntime, build_runtime, resolve_device, sleep_mode_supported
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DemoRuntime",
    "Engine",
    "Generation",
    "HuggingFaceEngine",
    "KVCache",
    "SamplingParams",
    "TinyEngine",
    "TinyTransformer",
    "TinyTransformerConfig",
    "build_runtime",
    "create_app",
    "resolve_device",
    "sleep_mode_supported",
]
