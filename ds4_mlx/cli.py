"""The `ds4-mlx` command line: one typer app, each command in the module of its concern."""

import typer

from .convert.commands import convert

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(convert)


@app.callback()
def main():
    """DeepSeek V4 Flash on MLX."""
