"""The frozen judge: shapes, a lossless save/load, seeded training that learns.

Real MNIST is not available in tests: the classifier learns the synthetic digits
of tests/helpers.py (10 classes of bars) in about a second; conftest's trained_judge is
trained so once, for test_quality.py too.
"""

from __future__ import annotations

import runpy

import torch
import yaml

from mnist_gan.classifier import N_FEATURES, Classifier, load_classifier, save_classifier, train_classifier
from mnist_gan.files import read_json
from mnist_gan.params import ClassifierParams
from tests.helpers import CPU, REPO, synthetic_inputs, write_synthetic_mnist


def test_shapes():
    model = Classifier().eval()
    x = torch.rand(5, 784) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, N_FEATURES) == (5, model.num_features)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = Classifier().eval()
    path = tmp_path / "models" / "classifier.pt"
    save_classifier(model, path)
    loaded = load_classifier(path, CPU)
    x = torch.rand(8, 784) * 2 - 1
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.features(x), model.features(x))
    assert [p.name for p in path.parent.iterdir()] == ["classifier.pt"]  # no temporary file left


def test_training_reaches_high_accuracy(trained_judge):
    model, accuracy = trained_judge
    test_x, test_y = synthetic_inputs(500, seed=2)  # its test set
    assert not model.training
    assert accuracy >= 0.98
    # the reported number is the model's accuracy on the test set
    assert accuracy == (model(test_x).argmax(1) == test_y).double().mean().item()


def test_training_is_seeded():
    x, y = synthetic_inputs(200, seed=1)
    params = ClassifierParams(seed=3, epochs=1, batch_size=32, lr=1e-3)
    first, acc_first = train_classifier(x, y, x, y, params, CPU)
    second, acc_second = train_classifier(x, y, x, y, params, CPU)
    assert acc_first == acc_second
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_stage_writes_the_weights_and_the_accuracy(tmp_path, monkeypatch):
    write_synthetic_mnist(tmp_path / "data" / "MNIST" / "raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params |= {"device": "cpu", "classifier": {"seed": 0, "epochs": 1, "batch_size": 32, "lr": 0.003}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages" / "train_classifier.py"))["main"]()

    metrics = read_json("metrics/classifier.json")
    assert set(metrics) == {"accuracy", "epochs", "seconds"}
    assert metrics["epochs"] == 1 and metrics["accuracy"] >= 0.98
    test_x, test_y = synthetic_inputs(200, seed=1)  # conftest's test split
    model = load_classifier("models/classifier.pt", CPU)
    assert (model(test_x).argmax(1) == test_y).double().mean().item() == metrics["accuracy"]
