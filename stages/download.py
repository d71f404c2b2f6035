"""DVC stage `download`: the four MNIST IDX files, verified, in data/MNIST/raw."""

import logging

from mnist_gan import paths
from mnist_gan.data import prepare_mnist
from mnist_gan.errors import run_stage
from mnist_gan.params import load_params


def main() -> None:
    params = load_params()
    source = prepare_mnist(paths.RAW_DIR, params.data.source, verify=params.data.verify)
    logging.info("MNIST ready in %s (source: %s)", paths.RAW_DIR, source)


if __name__ == "__main__":
    run_stage(main)
