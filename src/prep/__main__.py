"""``python -m prep`` runs the ``cifar10-prep`` console script."""

from prep import cli

if __name__ == "__main__":
    cli.entrypoint()
