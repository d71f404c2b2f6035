"""DVC stage `evaluate`: metrics/eval.json for the trained GAN, also logged to its MLflow run."""

import logging

import torch

from mnist_gan import paths, tracking
from mnist_gan.classifier import load_classifier
from mnist_gan.data import load_images
from mnist_gan.files import read_json, write_json
from mnist_gan.models import load_model
from mnist_gan.params import load_params, resolve_device
from mnist_gan.quality import quality_metrics
from mnist_gan.training import d_scores, sample

N_FLOOR = 10_000  # real training images scored against the test set: the FID of perfect samples


def main() -> None:
    params = load_params()
    device = resolve_device(params.device)
    run_id = read_json(paths.TRAIN_METRICS)["mlflow_run_id"]
    tracking.check_run(run_id)  # fail before the work, not when logging it
    generator = load_model(paths.GENERATOR, device)
    discriminator = load_model(paths.DISCRIMINATOR, device)
    classifier = load_classifier(paths.CLASSIFIER, device)
    test_images = load_images(paths.RAW_DIR, train=False, device=device)
    floor_images = load_images(paths.RAW_DIR, train=True, device=device)[:N_FLOOR]

    # a fixed seed for z: the same generator always gets the same numbers
    rng = torch.Generator(device).manual_seed(params.eval.seed)
    p_real, p_fake = d_scores(generator, discriminator, test_images, params.eval.n_samples, rng=rng)
    fake = sample(generator, torch.randn(params.eval.n_samples, generator.d_noise, device=device,
                                         generator=rng))
    metrics = {"p_real": p_real, "p_fake": p_fake,
               **quality_metrics(classifier, fake, test_images, floor_real=floor_images)}
    # rounded: equal models give byte-identical JSON, and diffs stay readable
    metrics = {key: round(value, 6) for key, value in metrics.items()}
    write_json(paths.EVAL_METRICS, metrics)

    with tracking.open_run(run_id) as tracker:
        tracker.log_metrics(metrics, prefix="eval")
        tracker.log_artifact(paths.EVAL_METRICS)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
