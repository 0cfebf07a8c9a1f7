"""The `ds4-mlx server` command."""

import contextlib
import logging
from typing import Annotated, Optional

import typer

from ..commands import (Ctx, KVDir, KVSpace, ModelDir, NoThink, PrefillStep, Think, ThinkMax, mode_from_flags,
                        open_session)

GRACE = 5  # seconds running requests get to finish at shutdown before they are cancelled

Host = Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")]
Port = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1,
                                        help="Most tokens to generate for a request that sets no max_tokens.")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="DS4_MLX_API_KEY",
                                               help="Require this key (Authorization: Bearer KEY or x-api-key: KEY).")]
Cors = Annotated[bool, typer.Option("--cors", help="Allow cross-origin requests from any origin (for browsers).")]
ModelId = Annotated[Optional[str], typer.Option("--model-id", help="The model's name in the API (default: the "
                                                                     "model directory's name).")]


def server(
    model: ModelDir, host: Host = "127.0.0.1", port: Port = 8000, ctx: Ctx = 32768, max_tokens: MaxTokens = 32768,
    kv_disk_dir: KVDir = None, kv_disk_space_mb: KVSpace = 4096, api_key: ApiKey = None, cors: Cors = False,
    model_id: ModelId = None, nothink: NoThink = False, think: Think = False, think_max: ThinkMax = False,
    prefill_step: PrefillStep = 2048,
):
    """Serve the model over OpenAI- and Anthropic-compatible HTTP APIs: one live session, one
    request at a time. --nothink/--think/--think-max: the mode of requests that ask for none."""
    import uvicorn

    from .app import create_app
    from .request import Settings
    from .worker import Worker

    mode = mode_from_flags(nothink, think, think_max)
    log = logging.getLogger("ds4_mlx.server")
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())
    worker = Worker(lambda: open_session(model, ctx, kv_disk_dir, kv_disk_space_mb, None), prefill_step)
    worker.start()
    settings = Settings(model_id or model.resolve().name, ctx, max_tokens, mode)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises SIGINT after its graceful shutdown
        uvicorn.run(create_app(worker, settings, api_key, cors), host=host, port=port, access_log=False,
                    timeout_graceful_shutdown=GRACE)
