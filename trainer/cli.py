"""``trainer`` command line. Training itself arrives with the trainer release; for now the
command can read and summarise a shard set, which checks the shared schema end to end."""
from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train networks that find the same visual pattern in two images, from datagen shards."""


@main.command()
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
def inspect(shards):
    """Read every sample of a shard directory (or one .tar) and print what it holds."""
    from .data import summarise

    try:
        summary = summarise(shards)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    for key, value in summary.items():
        click.echo(f"{key}: {value}")
