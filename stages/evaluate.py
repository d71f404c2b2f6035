"""DVC stage `evaluate`: metrics/eval.json for the trained GAN, also logged to its MLflow run."""

import torch

from mnist_gan import paths, store, tracking
from mnist_gan.classifier import load_classifier, predict
from mnist_gan.data import load_images, load_labelled
from mnist_gan.errors import run_stage
from mnist_gan.files import read_json, write_json
from mnist_gan.models import load_model
from mnist_gan.params import load_params, resolve_device
from mnist_gan.quality import frechet_distances, quality_metrics
from mnist_gan.signals import exit_on_stop_signals
from mnist_gan.training import d_scores, latents, sample

N_FLOOR = 10_000  # real training images scored against the test set: the FID of perfect samples


def main() -> None:
    params = load_params()
    device = resolve_device(params.device)
    run_id = read_json(paths.TRAIN_METRICS)["mlflow_run_id"]
    store.check_reachable(store.tracking_uri())  # fail before the work, not when logging it
    generator = load_model(paths.GENERATOR, device)
    discriminator = load_model(paths.DISCRIMINATOR, device)
    classifier = load_classifier(paths.CLASSIFIER, device)
    trained = load_model(paths.GENERATOR, device, trained=True)  # None unless the generator is an EMA
    test_images, test_labels = load_labelled(paths.RAW_DIR, train=False, device=device)
    floor_images = load_images(paths.RAW_DIR, train=True, device=device)[:N_FLOOR]

    # a fixed seed for z (and labels): the same generator always gets the same numbers
    def rng() -> torch.Generator:
        return torch.Generator(device).manual_seed(params.eval.seed)

    p_real, p_fake = d_scores(generator, discriminator, test_images, params.eval.n_samples,
                              real_labels=test_labels, rng=rng())
    fake = sample(generator, *latents(generator, params.eval.n_samples, device, rng()))
    metrics = {"p_real": p_real, "p_fake": p_fake,
               **quality_metrics(classifier, fake, test_images, floor_real=floor_images)}
    if trained is not None:
        # what the EMA buys: the same metric for the trained weights it averages
        fake = sample(trained, *latents(trained, params.eval.n_samples, device, rng()))
        # the FID alone: quality_metrics would also redo precision/recall on 10k x 10k distances
        real_features, fake_features = predict(classifier, test_images)[0], predict(classifier, fake)[0]
        metrics["fid_without_ema"] = frechet_distances(real_features, [fake_features])[0]
    # rounded: equal models give byte-identical JSON, and diffs stay readable
    metrics = {key: round(value, 6) for key, value in metrics.items()}
    write_json(paths.EVAL_METRICS, metrics)

    with tracking.open_stage_run(run_id, params, str(device)) as tracker:
        tracker.log_metrics(metrics, prefix="eval")
        tracker.log_artifact(paths.EVAL_METRICS)


if __name__ == "__main__":
    with exit_on_stop_signals():  # SIGTERM ends the MLflow run FAILED, not RUNNING
        run_stage(main)
