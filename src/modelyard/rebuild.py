"""Rebuild a registered version from its lineage and prove the record is enough.

`modelyard rebuild NAME VERSION` checks the recorded commit out into a clean worktree, loads
the spec from it, checks the data still has the recorded fingerprint (and stops, saying so,
when it has not), names every library whose version differs from the recorded one, then
trains, exports and compares the rebuilt model's ONNX with the registered bundle's on the
evaluation split: the same bytes, the same predictions, or predictions within the spec's parity
tolerance. The outcome is recorded on the version (`rebuild.*` tags, and its card).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from modelyard import bundle as bundles
from modelyard import registry, stages
from modelyard.config import Settings
from modelyard.deploy import card
from modelyard.errors import ModelyardError
from modelyard.lineage import library_tags
from modelyard.package.build import frame_columns
from modelyard.package.onnx import export_onnx
from modelyard.package.registered import open_registered
from modelyard.serve import codecs
from modelyard.serve.runtime import Prediction, Runtime
from modelyard.spec import Spec, load_spec

Progress = Callable[[str], None]


@dataclass
class Rebuild:
    model: str
    version: str
    outcome: str = ""  # identical | same-predictions | within-tolerance | differs | stopped
    detail: str = ""
    libraries: list[str] = field(default_factory=list)  # "name: recorded → running"

    @property
    def matched(self) -> bool:
        return self.outcome in ("identical", "same-predictions", "within-tolerance")

    def tags(self) -> dict[str, str]:
        return {"rebuild.outcome": self.outcome, "rebuild.detail": self.detail,
                "rebuild.libraries": "; ".join(self.libraries) or "as recorded",
                "rebuild.when": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


def rebuild(
    settings: Settings, model: str, version: str, repository: Path, progress: Progress
) -> Rebuild:
    """Rebuild `model` `version` from `repository` (a git checkout holding its commit)."""
    client = registry.connect(settings)
    tags = dict(client.get_model_version(model, version).tags)
    done = Rebuild(model, version)
    try:
        _rebuild(settings, tags, repository, done, progress)
    except _Stopped as stop:
        done.outcome, done.detail = "stopped", str(stop)
    registry.tag_version(client, model, version, done.tags())
    card.refresh(settings, model, [version], progress)
    return done


class _Stopped(Exception):
    """The rebuild cannot go on (the data changed, the record lacks what it needs)."""


def _rebuild(
    settings: Settings, tags: dict[str, str], repository: Path, done: Rebuild, say: Progress
) -> None:
    commit, spec_file = tags.get("git_commit", ""), tags.get("spec_path", "")
    if not commit or not spec_file:
        raise _Stopped("the version records no commit or spec path (registered before rebuilds "
                       "were possible, or outside a git checkout)")  # fmt: skip
    if tags.get("git_dirty") == "true":
        raise _Stopped(f"it was trained from a checkout with uncommitted changes: commit "
                       f"{commit[:12]} does not hold what trained it")  # fmt: skip
    done.libraries = _library_differences(tags)
    for line in done.libraries:
        say(f"rebuild: library differs: {line}")
    with _worktree(repository, commit) as tree:
        say(f"rebuild: commit {commit[:12]} checked out clean in {tree}")
        spec = load_spec(tree / spec_file)
        _bring_untracked_data(spec, tree / spec_file, repository / spec_file, say)
        if spec.digest() != tags.get("spec_hash"):
            raise _Stopped(f"the spec at {spec_file} in {commit[:12]} is not the one recorded")
        prepared = stages.prepare(spec)
        if prepared.fingerprint != tags.get("data_fingerprint"):
            raise _Stopped(
                f"the data changed: {prepared.source} has fingerprint "
                f"{prepared.fingerprint[:16]}, the version recorded "
                f"{tags.get('data_fingerprint', '?')[:16]}; restore the data it was trained on"
            )
        say(f"rebuild: data as recorded ({prepared.detail}); training …")
        trained = stages.train(spec, prepared.splits)
        rebuilt = export_onnx(trained.model, spec)
        registered = _registered(settings, spec.name, done.version)
        _compare(done, spec, prepared.splits.eval, rebuilt, registered)


def _bring_untracked_data(spec: Spec, in_tree: Path, in_checkout: Path, say: Progress) -> None:
    """A data file the commit does not hold (ignored by git, fetched beside the code) is read
    from the checkout, at the same place: its fingerprint still decides whether it changed."""
    path = spec.dataset.path
    if not path or "://" in path or Path(path).is_absolute():
        return
    wanted, there = in_tree.parent / path, in_checkout.parent / path
    if not wanted.exists() and there.is_file():
        wanted.parent.mkdir(parents=True, exist_ok=True)
        wanted.symlink_to(there.resolve())
        say(f"rebuild: {path} is not in the commit; reading the checkout's copy")


def _library_differences(tags: dict[str, str]) -> list[str]:
    running = library_tags()
    recorded = {k: v for k, v in tags.items() if k.startswith("lib.")}
    names = sorted(set(recorded) | set(running))
    return [f"{n[4:]}: {recorded.get(n, 'not recorded')} → {running.get(n, 'not installed')}"
            for n in names if recorded.get(n) != running.get(n)]  # fmt: skip


@contextlib.contextmanager
def _worktree(repository: Path, commit: str) -> Iterator[Path]:
    """`commit` checked out in a temporary worktree of `repository`, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="modelyard-rebuild-"))
    tree = folder / "tree"
    added = subprocess.run(["git", "-C", str(repository), "worktree", "add", "--detach",
                            str(tree), commit], capture_output=True, text=True)  # fmt: skip
    if added.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise _Stopped(f"commit {commit[:12]} is not in {repository}: {added.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(repository), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class _Registered:
    onnx: bytes = field(repr=False)
    schema: bytes = field(repr=False)
    metadata: bytes = field(repr=False)

    def runtime(self, onnx: bytes | None = None) -> Runtime:
        """ONNX Runtime over these files, in memory; with `onnx`, over another model with
        the same schema (the rebuilt one)."""
        files = {"model.onnx": onnx or self.onnx, "schema.json": self.schema,
                 "metadata.json": self.metadata}  # fmt: skip
        return Runtime(bundles.VerifiedBundle(Path("."), {}, "in-memory", "", files))


def _registered(settings: Settings, model: str, version: str) -> _Registered:
    """The registered bundle's model and schema, verified (and decrypted) in memory."""
    with tempfile.TemporaryDirectory() as folder:
        verified = open_registered(settings, model, version, Path(folder))
        return _Registered(*(verified.read_bytes(n) for n in
                             ("model.onnx", "schema.json", "metadata.json")))  # fmt: skip


def _compare(done: Rebuild, spec: Spec, frame: pd.DataFrame, rebuilt: bytes,
             registered: _Registered) -> None:  # fmt: skip
    """The rebuilt model against the registered one on the evaluation split: the same bytes,
    the same predictions, within the spec's parity tolerance, or not."""
    theirs, ours = registered.runtime(), registered.runtime(rebuilt)
    features = frame_columns(frame.loc[:, spec.feature_names])
    feeds, _ = codecs.to_feeds(features, theirs.columns, max_rows=len(frame) + 1)
    a, b = (_scores(r.predict(feeds)) for r in (theirs, ours))
    if rebuilt == registered.onnx:
        done.outcome, done.detail = "identical", f"the same ONNX bytes ({len(rebuilt)} bytes)"
    elif np.array_equal(a, b):
        done.outcome = "same-predictions"
        done.detail = f"identical predictions on all {len(frame)} evaluation rows"
    else:
        tolerance = spec.package.tolerance
        worst = float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
        close = np.allclose(a, b, rtol=tolerance.rtol, atol=tolerance.atol)
        done.outcome = "within-tolerance" if close else "differs"
        done.detail = (f"largest difference {worst:.3g} on {len(frame)} evaluation rows "
                       f"(tolerance rtol {tolerance.rtol}, atol {tolerance.atol})")  # fmt: skip


def _scores(prediction: Prediction) -> np.ndarray:
    return prediction.probabilities if prediction.probabilities is not None else prediction.values


def require(done: Rebuild) -> None:
    """For the CLI: a rebuild that did not match is an error with its reason."""
    if not done.matched:
        raise ModelyardError(
            f"rebuild of {done.model} v{done.version} {done.outcome}: {done.detail}"
        )
