"""The `ds4-mlx` command line: one typer app, each command in the module of its concern."""

import typer

from .commands import chat_command, generate
from .convert.commands import convert, imatrix
from .server.command import server

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(convert)
app.command()(imatrix)
app.command()(generate)
app.command("chat")(chat_command)
app.command()(server)


@app.callback()
def main():
    """DeepSeek V4 Flash on MLX."""


if __name__ == "__main__":
    app()
