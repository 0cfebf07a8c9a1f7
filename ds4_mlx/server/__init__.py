"""`ds4-mlx server`: OpenAI- and Anthropic-compatible HTTP APIs over one live session.

`app` (FastAPI routes, auth, errors, SSE), `worker` (the inference thread, its queue, the
tool-call memory), `openai_api` and `anthropic_api` (requests in, responses and events out),
`stream` (worker events, stop strings), `request` (the worker's request, the thinking switch),
`command` (the CLI command)."""
