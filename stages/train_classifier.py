"""DVC stage `train_classifier`: the frozen judge of sample quality and its test accuracy.

Depends only on the data and the `classifier` params group, so GAN experiments
(`dvc exp run -S lr=...`) reuse the cached weights and their metrics stay comparable.
"""

import logging
import time

from mnist_gan import paths
from mnist_gan.classifier import save_classifier, train_classifier
from mnist_gan.data import load_split, to_model_input
from mnist_gan.errors import run_stage
from mnist_gan.files import write_json
from mnist_gan.params import load_params, resolve_device

log = logging.getLogger(__name__)

MIN_ACCURACY = 0.99


def main() -> None:
    params = load_params()
    device = resolve_device(params.device)
    train_images, train_labels = load_split(paths.RAW_DIR, train=True)
    test_images, test_labels = load_split(paths.RAW_DIR, train=False)

    start = time.perf_counter()
    model, accuracy = train_classifier(to_model_input(train_images), train_labels,
                                       to_model_input(test_images), test_labels,
                                       params.classifier, device)
    seconds = time.perf_counter() - start
    save_classifier(model, paths.CLASSIFIER)
    write_json(paths.CLASSIFIER_METRICS, {
        "accuracy": round(accuracy, 6),
        "epochs": params.classifier.epochs,
        "seconds": round(seconds, 1),
    })
    log.info("classifier: test accuracy %.4f after %d epochs (%.0f s)",
             accuracy, params.classifier.epochs, seconds)
    if accuracy < MIN_ACCURACY:
        log.warning("classifier test accuracy %.4f is below %.2f: its features are a weak judge; "
                    "raise classifier.epochs in conf/config.yaml", accuracy, MIN_ACCURACY)


if __name__ == "__main__":
    run_stage(main)
