"""params.yaml as DVC composes it from conf/, and `make repro`'s step that writes it.

With `hydra.enabled` in .dvc/config, every `dvc exp run` rewrites params.yaml from conf/
(conf/config.yaml, then the model file its defaults list or `-S model=...` picks), applying its
`-S` overrides: a hand edit of params.yaml is silently dropped there, while `dvc repro` runs
params.yaml as it is. `make repro` composes first, as `dvc exp run` does, so both run the
same params; unlike DVC, it refuses to overwrite an uncommitted edit of params.yaml.
The composing itself is DVC's own function, with the settings DVC reads.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mnist_gan.errors import UserError
from mnist_gan.files import write_text

PARAMS = "params.yaml"  # DVC's default params file, the one its Hydra support writes


class CompositionError(UserError):
    """conf/ cannot be composed, or params.yaml holds edits that composing would drop."""


def compose(root: Path, overrides: list[str] | None = None) -> str:
    """The params.yaml that `dvc exp run -S <overrides>` writes in the repo at `root`."""
    from dvc.repo import Repo
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    root = root.resolve()  # Hydra takes absolute folders only
    with Repo(str(root)) as repo:
        hydra = repo.config.get("hydra", {})
    if not hydra.get("enabled"):
        raise CompositionError(f"{root / '.dvc/config'}: hydra is not enabled; "
                               "run `dvc config hydra.enabled true`")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / PARAMS
        try:
            compose_and_dump(out, str(root / hydra.get("config_dir", "conf")), None,
                             hydra.get("config_name", "config"), str(root / hydra.get("plugins_path", "")),
                             overrides or [])
        except HydraException as err:
            # Hydra's message, without the search path it appends
            reason = " ".join(str(err).split("Config search path")[0].split())
            raise CompositionError(f"conf/ does not compose with {overrides or []}: {reason}") from None
        return out.read_text()


def differences(old: str, new: str) -> list[str]:
    """`key: old -> new` for each flat (dotted) key whose value differs between two params files."""
    before, after = _flat(yaml.safe_load(old) or {}), _flat(yaml.safe_load(new) or {})
    return [f"{key}: {before.get(key, '(none)')} -> {after.get(key, '(none)')}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _committed(root: Path) -> str | None:
    done = subprocess.run(["git", "show", f"HEAD:{PARAMS}"], cwd=root, capture_output=True, text=True,
                          check=False)
    return done.stdout if done.returncode == 0 else None


def sync(root: Path) -> str:
    """Write params.yaml from conf/ (what `dvc exp run` would run); a line saying what changed.

    params.yaml equal to its last commit but not to conf/ means conf/ was edited: it is rewritten.
    params.yaml edited since the last commit (by hand, or by a `dvc exp run -S` in the workspace)
    is an error instead: composing would silently throw that edit away.
    """
    path = root / PARAMS
    composed = compose(root)
    current = path.read_text() if path.is_file() else None
    if current == composed:
        return f"{PARAMS} is the composition of conf/"
    if current is not None and current != _committed(root):
        changes = "; ".join(f"{line} in conf/" for line in differences(current, composed))
        raise CompositionError(
            f"{PARAMS} was edited since the last commit and differs from conf/ ({changes}), and "
            f"composing conf/ would throw that edit away (so would `dvc exp run`): make the change in "
            f"conf/, or `git checkout HEAD -- {PARAMS}` to drop it; `dvc repro` runs {PARAMS} as it is")
    write_text(path, composed)
    changes = "; ".join(differences(current or "", composed))
    return f"{PARAMS} composed from conf/: {changes}"
