"""DVC stage `train`: the GAN, its per-epoch history and the MLflow run.

Resumes from checkpoints/train.pt when a previous run with the same params was
interrupted; the checkpoint is removed once the outputs are written.
"""


import pandas as pd
import torch

from mnist_gan import checkpoint, mlflow_model, paths, store, tracking
from mnist_gan.data import load_labelled
from mnist_gan.errors import run_stage
from mnist_gan.files import atomic_path, write_json
from mnist_gan.models import save_model
from mnist_gan.params import load_params, resolve_device
from mnist_gan.signals import exit_on_stop_signals
from mnist_gan.training import train


def main() -> None:
    params = load_params()
    device = resolve_device(params.device)
    store.check_reachable(store.tracking_uri())  # fail before loading data or training
    resume = checkpoint.load(paths.CHECKPOINT, params)
    train_images, train_labels = load_labelled(paths.RAW_DIR, train=True, device=device)
    test_images, test_labels = load_labelled(paths.RAW_DIR, train=False, device=device)

    with tracking.open_training_run(params, str(device), resume) as tracker:
        tracker.log_datasets(paths.RAW_DIR)
        result = train(params, train_images, test_images, device, train_labels=train_labels,
                       test_labels=test_labels, tracker=tracker, checkpoint_path=paths.CHECKPOINT,
                       resume=resume)
        # the generator evaluate and generate use: the EMA average when on, with the trained weights kept
        save_model(result.sampler, paths.GENERATOR, trained=None if result.ema is None else result.generator)
        save_model(result.discriminator, paths.DISCRIMINATOR)
        with atomic_path(paths.SAMPLES) as tmp:
            torch.save(result.samples, tmp)
        with atomic_path(paths.HISTORY) as tmp:
            pd.DataFrame(result.history).to_csv(tmp, index=False, float_format="%.6g")
        final = result.history[-1]
        write_json(paths.TRAIN_METRICS, {
            "p_real": final["p_real"],
            "p_fake": final["p_fake"],
            "epochs": final["epoch"],
            "train_seconds": round(result.train_seconds, 2),
            "seconds_per_epoch": round(result.train_seconds / len(result.history), 3),
            "device": str(device),
            "mlflow_run_id": tracker.run_id,
        })
        tracker.log_artifact(paths.HISTORY)
        mlflow_model.log_generator(result.sampler, paths.GENERATOR)
    paths.CHECKPOINT.unlink(missing_ok=True)


if __name__ == "__main__":
    with exit_on_stop_signals():  # SIGTERM ends the MLflow run FAILED, not RUNNING
        run_stage(main)
