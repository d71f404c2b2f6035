"""DVC stage `evaluate`: metrics/eval.json for the trained GAN, also logged to its MLflow run."""

import logging

import torch

from mnist_gan import paths, tracking
from mnist_gan.data import load_images
from mnist_gan.files import read_json, write_json
from mnist_gan.models import load_model
from mnist_gan.params import load_params, resolve_device
from mnist_gan.training import d_scores


def main() -> None:
    params = load_params()
    device = resolve_device(params.device)
    run_id = read_json(paths.TRAIN_METRICS)["mlflow_run_id"]
    tracking.check_run(run_id)  # fail before the work, not when logging it
    generator = load_model(paths.GENERATOR, device)
    discriminator = load_model(paths.DISCRIMINATOR, device)
    test_images = load_images(paths.RAW_DIR, train=False, device=device)

    # a fixed seed for z: the same generator always gets the same numbers
    rng = torch.Generator(device).manual_seed(params.eval.seed)
    p_real, p_fake = d_scores(generator, discriminator, test_images, params.eval.n_samples, rng=rng)
    metrics = {"p_real": round(p_real, 6), "p_fake": round(p_fake, 6)}
    write_json(paths.EVAL_METRICS, metrics)

    with tracking.open_run(run_id) as tracker:
        tracker.log_metrics(metrics, prefix="eval")
        tracker.log_artifact(paths.EVAL_METRICS)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
