"""``charlm serve``: a streaming HTTP API in the shape of OpenAI's completions, with every active
request a row of one batched recurrent step (continuous batching without a KV cache)."""
