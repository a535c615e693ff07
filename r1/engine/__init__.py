"""The engine: sequences, KV block bookkeeping, scheduling, the model runner, the core and its
output processor.

The rest of r1 reaches the engine through the names below (never its modules), and an engine
through its public surface: add_requests, abort, step, has_unfinished, stats and config_record,
with max_model_len and eos_token_ids; tests/test_layout.py holds r1 and bench/ to that. The names
load on first use, so the bookkeeping modules (sequence, block_manager, scheduler) import without
torch.
"""

import importlib

_PUBLIC = {
    "AsyncLLM": "async_llm",
    "EngineDeadError": "async_llm",
    "QueueFullError": "async_llm",
    "RequestStream": "async_llm",
    "EngineRequest": "interface",
    "EngineStats": "interface",
    "PromptTooLongError": "interface",
    "RequestOutput": "interface",
    "StepError": "interface",
    "TokenConstraint": "interface",
    "LLMEngine": "llm_engine",
    "ModelRunner": "model_runner",
    "SchedulerConfig": "scheduler",  # what an engine is built from
    "SpeculativeConfig": "speculative",
    "Speculator": "speculative",
    "NgramProposer": "speculative",
    "DraftProposer": "speculative",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'r1.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"r1.engine.{_PUBLIC[name]}"), name)
