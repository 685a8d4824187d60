"""Serving a checkpoint the way DeepSeek-R1 reached people: an OpenAI-compatible API whose replies
carry the chain of thought in `reasoning_content`, and a web chat.

    assistant.py  the served model, chat prompts, replies split into reasoning and answer
    worker.py     the engine thread: requests join the running batch at step boundaries
    schemas.py    request validation, OpenAI-style errors and the OpenAPI schema
    observe.py    request ids, the access log, tracebacks kept in the log, key=value log lines
    app.py        the FastAPI app (`create_app`) and the web chat's static files
    server.py     uvicorn in the foreground (logging to stderr) or on a background thread

It builds on the engine, tokenizer, checkpoint and hf modules, never on training or evaluation.
"""

from r1lab.serve.app import ServeSettings, create_app
from r1lab.serve.assistant import ServedModel, load_served_model

__all__ = ["ServeSettings", "ServedModel", "create_app", "load_served_model"]
