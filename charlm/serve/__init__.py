"""``charlm serve``: a streaming HTTP API in the shape of OpenAI's completions, with every active
request a row of one batched recurrent step (continuous batching without a KV cache)."""

from charlm.extras import require

require("serve", "charlm serve")  # before any module here imports starlette or uvicorn
