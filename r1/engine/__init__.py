"""The engine: sequences, KV block bookkeeping, scheduling, the model runner and the step loop."""
