"""Where each stage reads and writes, relative to the repository root (as in dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/MNIST/raw")
GENERATOR = Path("models/generator.pt")
DISCRIMINATOR = Path("models/discriminator.pt")
SAMPLES = Path("models/samples.pt")
CLASSIFIER = Path("models/classifier.pt")
CHECKPOINT = Path("checkpoints/train.pt")
HISTORY = Path("metrics/history.csv")
TRAIN_METRICS = Path("metrics/train.json")
EVAL_METRICS = Path("metrics/eval.json")
CLASSIFIER_METRICS = Path("metrics/classifier.json")
PLOTS = Path("plots")
