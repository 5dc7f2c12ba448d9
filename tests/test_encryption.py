"""Encrypted bundles: the model and its schema sealed with AES-256-GCM, opened in memory only
with the right key, by the package stage's proof, by `modelyard serve` and by KMS envelope
keys (moto in server mode)."""

from __future__ import annotations

import base64
import os
import shutil

import httpx
import numpy as np
import pytest

from modelyard.bundle import ENCRYPTED, BundleError, Encryption, bundle_key_id, verify
from modelyard.bundle import parse_public_keys as trusted
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.package import sealing
from modelyard.package.build import frame_columns
from modelyard.serve import codecs
from modelyard.serve.runtime import Runtime
from tests.conftest import free_port
from tests.serving import TOKEN, Built, Server, build_example

KEY = os.urandom(32)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("sealed"), encryption=Encryption(KEY))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("plain"))


def _plain_markers(built: Built) -> list[bytes]:
    """Bytes any plaintext copy of the model or its schema holds: the ONNX converter's name,
    the graph's input names, the features' names."""
    return [b"skl2onnx", *(f.name.encode() for f in built.spec.features)]


def test_the_model_and_its_schema_are_ciphertext_and_open_only_with_the_key(sealed, tmp_path):
    folder = sealed.bundle.path
    names = {p.name for p in folder.iterdir()}
    for name in set(ENCRYPTED) & names:
        data = (folder / name).read_bytes()
        found = [m for m in _plain_markers(sealed) if m in data]
        assert found == [], f"{name} holds {found} in the clear"
    keys = trusted(sealed.public_key)
    with pytest.raises(BundleError, match=r"is encrypted with key .* no key given opens it"):
        verify(folder, keys)
    with pytest.raises(BundleError, match=r"\(given: [0-9a-f]{16}\)"):
        verify(folder, keys, [os.urandom(32)])
    opened = verify(folder, keys, [os.urandom(32), KEY])  # a rotation list: the right one opens
    assert opened.manifest["encryption"]["key_id"] == bundle_key_id(KEY)
    assert opened.read_json("schema.json")["task"] == "binary_classification"
    # The signature covers the ciphertext: a changed byte is refused before any decryption.
    altered = tmp_path / "altered"
    shutil.copytree(folder, altered)
    blob = bytearray((altered / "model.onnx").read_bytes())
    blob[-1] ^= 1
    (altered / "model.onnx").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"altered: \['model.onnx'\]"):
        verify(altered, keys, [KEY])


def test_an_encrypted_bundle_predicts_as_the_plain_one(sealed, plain):
    frame = sealed.prepared.splits.eval.head(50).loc[:, sealed.spec.feature_names]
    results = []
    for built, keys in ((sealed, [KEY]), (plain, [])):
        runtime = Runtime(verify(built.bundle.path, trusted(built.public_key), keys))
        feeds, _ = codecs.to_feeds(frame_columns(frame), runtime.columns, max_rows=100)
        results.append(runtime.predict(feeds).probabilities)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_the_server_serves_with_the_key_and_refuses_without_it_or_with_another(sealed):
    wrong = base64.b64encode(os.urandom(32)).decode()
    # Refused by the one worker itself, or (two workers) by the supervisor's check in a child.
    for workers, key, expected in ((1, "", "no key given opens it"),
                                   (2, wrong, "no key given opens it"),
                                   (2, "c2hvcnQ=", "not base64 of a 32-byte key")):  # fmt: skip
        refused = Server(sealed.bundle.path, sealed.public_key, workers=workers,
                         MODELYARD_BUNDLE_KEY=key)  # fmt: skip
        assert refused.process.wait(timeout=60) == 3
        out = refused.stop()
        assert expected in out, out
        assert base64.b64encode(KEY).decode() not in out
    # Two workers: each opens the bundle with the key itself (the digest its supervisor vouched
    # for checks a plain bundle only).
    server = Server(sealed.bundle.path, sealed.public_key, workers=2,
                    MODELYARD_BUNDLE_KEY=base64.b64encode(KEY).decode()).start()  # fmt: skip
    try:
        example = verify(sealed.bundle.path, trusted(sealed.public_key), [KEY]).read_json(
            "schema.json"
        )["example"]
        answer = httpx.post(f"{server.url}/invocations", json={"inputs": example}, timeout=10,
                            headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert answer.status_code == 200 and len(answer.json()["predictions"]) > 0
    finally:
        server.stop()


def test_settings_keys_seal_with_the_first_and_name_a_bad_one(tmp_path):
    first, second = os.urandom(32), os.urandom(32)
    text = ",".join(base64.b64encode(k).decode() for k in (first, second))
    settings = Settings(workspace=tmp_path, bundle_key=text)
    made = sealing.encryption(settings)
    assert made is not None and made.key == first and str(made.key) not in repr(made)
    manifest = {"encryption": {"key_id": bundle_key_id(second)}}
    assert sealing.opening_keys(settings, manifest) == [second]
    assert sealing.opening_keys(settings, {}) == []
    other = {"encryption": {"key_id": bundle_key_id(os.urandom(32))}}
    with pytest.raises(ModelyardError, match="not among MODELYARD_BUNDLE_KEY's keys"):
        sealing.opening_keys(settings, other)
    with pytest.raises(ModelyardError, match=r"MODELYARD_BUNDLE_KEY: .* openssl rand -base64 32"):
        sealing.encryption(Settings(workspace=tmp_path, bundle_key="not-a-key"))
    key_file = tmp_path / "bundle.key"
    key_file.write_text(text + "\n")
    assert sealing.settings_keys(Settings(workspace=tmp_path, bundle_key_file=key_file)) == [
        first, second]  # fmt: skip
    assert sealing.encryption(Settings(workspace=tmp_path)) is None


def test_kms_gives_each_bundle_a_data_key_only_kms_unwraps(moto, monkeypatch, tmp_path):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAMODELYARDTEST", "AWS_SECRET_ACCESS_KEY": "x",
                        "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": moto}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    arn = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    settings = Settings(workspace=tmp_path, bundle_kms_key=arn)
    one, two = sealing.encryption(settings), sealing.encryption(settings)
    assert one is not None and two is not None and one.key != two.key
    entry = one.manifest_entry(["model.onnx"])
    assert entry["kms_key"] == arn and base64.b64decode(entry["wrapped_key"]) == one.wrapped
    assert one.key not in base64.b64decode(entry["wrapped_key"])
    assert sealing.opening_keys(settings, {"encryption": entry}) == [one.key]
    # Without KMS (here: it cannot be reached) nobody opens the bundle: the key is nowhere else.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ModelyardError, match="did not unwrap the bundle's key"):
        sealing.opening_keys(Settings(workspace=tmp_path), {"encryption": entry})


def test_a_bundle_without_encryption_reads_as_before(plain):
    opened = verify(plain.bundle.path, trusted(plain.public_key))
    assert opened.opened == {} and "encryption" not in opened.manifest
    data = (plain.bundle.path / "model.onnx").read_bytes() + opened.read_bytes("schema.json")
    assert all(m in data for m in _plain_markers(plain))  # what the scans look for is there
