"""``python -m localrun local ...`` is ``lambdatrain local ...``."""

from localrun import cli

if __name__ == "__main__":  # worker processes re-import this module under spawn; they must not run the CLI
    cli.entrypoint()
