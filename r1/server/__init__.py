"""`r1 serve`: the engine behind an OpenAI-compatible HTTP API, with metrics and a chat page.

Read in this order: protocol.py (the wire format), errors.py, structured.py (response_format as
a grammar constraint), metrics.py, serving.py (requests to the engine and back), app.py (routes,
limits, uvicorn). The engine runs in its own thread behind r1/engine/async_llm.py.
"""
