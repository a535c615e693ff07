"""r1: run DeepSeek-R1-Distill-Qwen-1.5B locally — generate, chat, serve, evaluate."""

from r1.llm import LLM, Completion
from r1.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "__version__"]
