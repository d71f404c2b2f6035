"""`python -m mnist_gan promote`: the MLflow Model Registry's champion generator.

A run's generator is registered as a new version of the model "mnist-gan" and
the alias `champion` moves to it only when its FID (the evaluate stage's
`eval/fid`, logged to the run) beats the current champion's; otherwise the
registry is left as it was. `generate --model models:/mnist-gan@champion` then
always samples the best generator so far.

Not a DVC stage: the registry is shared, mutable state outside the repository,
and a cached stage would not run again when another run takes the alias.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_gan import store
from mnist_gan.errors import UserError
from mnist_gan.mlflow_model import GENERATOR_MODEL

REGISTERED_MODEL = "mnist-gan"
ALIAS = "champion"
METRIC = "eval/fid"  # lower is better


class PromoteError(UserError):
    """A run that cannot be judged or registered; the message says what to do."""


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    message: str
    version: str  # the run's registered version


def _champion(client: MlflowClient) -> tuple[str, float] | None:
    """(version, fid) of the current champion, or None when there is none yet."""
    try:
        version = client.get_model_version_by_alias(REGISTERED_MODEL, ALIAS)
    except MlflowException:
        return None  # no registered model or no alias yet
    return str(version.version), float(version.tags["fid"])


def promote(run_id: str) -> Promotion:
    """Register `run_id`'s generator and move the champion alias to it if its FID is lower."""
    mlflow.set_tracking_uri(store.tracking_uri())
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PromoteError(f"no MLflow run {run_id} in {mlflow.get_tracking_uri()}: {err.message}") from None
    fid = run.data.metrics.get(METRIC)
    if fid is None:
        raise PromoteError(f"run {run_id} has no {METRIC}: run the evaluate stage (dvc repro) first")
    # MLflow gives versions as int from some calls and str from others: str throughout
    version = _version_of(client, run_id) or str(mlflow.register_model(
        _generator_uri(client, run), REGISTERED_MODEL, tags={"fid": str(fid)}).version)
    champion = _champion(client)
    if champion is not None:
        champion_version, best = champion
        if champion_version == version:
            return Promotion(False, f"version {version} (run {run_id}) is already the {ALIAS}, "
                                    f"fid {best:.4g}", version)
        if fid >= best:
            return Promotion(False, f"registered as version {version}, not promoted: fid {fid:.4g} does not "
                                    f"beat the {ALIAS}'s {best:.4g} (version {champion_version})", version)
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
    before = "no champion before" if champion is None else f"was version {champion[0]}, fid {champion[1]:.4g}"
    return Promotion(True, f"promoted: version {version} (run {run_id}, fid {fid:.4g}) is "
                           f"models:/{REGISTERED_MODEL}@{ALIAS} ({before})", version)


def _generator_uri(client: MlflowClient, run: mlflow.entities.Run) -> str:
    """models:/<model id> of the generator the train stage logged to `run` (MLflow 3 keeps logged
    models apart from run artifacts; naming it avoids MLflow's fallback warning for runs:/ URIs)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    logged = [client.get_logged_model(o.model_id) for o in sorted(outputs, key=lambda o: o.step)]
    generators = [m for m in logged if m.name == GENERATOR_MODEL]
    if not generators:
        raise PromoteError(f"run {run.info.run_id} has no logged '{GENERATOR_MODEL}' model: "
                           "it did not finish the train stage")
    return f"models:/{generators[-1].model_id}"


def _version_of(client: MlflowClient, run_id: str) -> str | None:
    """The version already registered for this run's generator, so promoting twice registers once."""
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
    return str(versions[0].version) if versions else None
