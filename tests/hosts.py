"""Real deploy targets for the tests: sshd instances on loopback ports, and a load loop.

Each SSH "host" is Debian's sshd on its own 127.0.0.1 port with its own host key, reached with a
key pair made for the session and checked against a known_hosts file (host key checking stays
on). Hosts share this machine's Docker engine; each gets its own service root and ports.
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from modelyard.ports import free_port

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    name: str
    port: int
    process: subprocess.Popen


@dataclass
class SshHosts:
    folder: Path
    hosts: list[SshHost]
    key: Path
    known_hosts: Path
    user: str = field(default_factory=getpass.getuser)

    def inventory(self, path: Path, per_host: dict[str, dict[str, Any]], **group: Any) -> Path:
        """An Ansible inventory of these hosts with `model_hosts` and per-host variables."""
        hosts = {
            h.name: {
                "ansible_host": "127.0.0.1",
                "ansible_port": h.port,
                **per_host.get(h.name, {}),
            }
            for h in self.hosts
            if h.name in per_host
        }
        common = {
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o IdentitiesOnly=yes",
            # The hosts' Debian Python: discovery would pick a pyenv shim from root's PATH here.
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        body = {"all": {"children": {"model_hosts": {"hosts": hosts, "vars": common | group}}}}
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path


def start_ssh_hosts(folder: Path, count: int) -> SshHosts:
    folder.mkdir(parents=True, exist_ok=True)
    privsep = Path("/run/sshd")  # sshd's privilege-separation folder
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd: run the tests as root (CI does) or create it")
        privsep.mkdir()
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    host_public = host_key.with_suffix(".pub").read_text().split()[:2]
    hosts, known = [], []
    for index in range(count):
        port = free_port()
        config = folder / f"sshd-{port}.conf"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {folder}/sshd-{port}.pid\nAuthorizedKeysFile {folder}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n"
        )
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
        hosts.append(SshHost(f"host-{'abcdefgh'[index]}", port, process))
        known.append(f"[127.0.0.1]:{port} {' '.join(host_public)}")
    (folder / "known_hosts").write_text("\n".join(known) + "\n")
    for host in hosts:
        _wait_port(host.port)
    return SshHosts(folder, hosts, client_key, folder / "known_hosts")


def lose_host(host: SshHost) -> None:
    """The host drops off the network: its sshd and every session it serves (an Ansible
    ControlPersist master included) die at once; the services it runs keep running."""
    children = subprocess.run(["pgrep", "-P", str(host.process.pid)], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
    host.process.kill()
    host.process.wait(timeout=10)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def restore_host(hosts: SshHosts, host: SshHost) -> None:
    config = hosts.folder / f"sshd-{host.port}.conf"
    host.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                    stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_port(host.port)


def stop_ssh_hosts(hosts: SshHosts) -> None:
    for host in hosts.hosts:
        host.process.terminate()
        host.process.wait(timeout=10)


def _wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"sshd on port {port} did not start")


V2_ROW = {"inputs": [
    {"name": "age", "shape": [1], "datatype": "FP32", "data": [29]},
    {"name": "gender", "shape": [1], "datatype": "BYTES", "data": ["female"]},
    {"name": "pages_viewed", "shape": [1], "datatype": "FP32", "data": [41]},
    {"name": "previous_clicks", "shape": [1], "datatype": "FP32", "data": [4]},
    {"name": "time_on_site", "shape": [1], "datatype": "FP32", "data": [17.5]},
    {"name": "device", "shape": [1], "datatype": "BYTES", "data": ["desktop"]},
]}  # fmt: skip


def v2_batches(frame: pd.DataFrame, rows: int) -> list[dict[str, Any]]:
    """`frame` as V2 requests of `rows` rows each, missing values as nulls (as clients send)."""
    batches = []
    for start in range(0, len(frame) - rows + 1, rows):
        chunk = frame.iloc[start : start + rows]
        inputs = [
            {"name": str(name), "shape": [rows],
             "datatype": "FP32" if pd.api.types.is_numeric_dtype(column) else "BYTES",
             "data": [None if pd.isna(v) else v for v in column.tolist()]}
            for name, column in chunk.items()
        ]  # fmt: skip
        batches.append({"inputs": inputs})
    return batches


class LoadLoop:
    """Sends one-row V2 requests over keep-alive connections until stopped; counts what answered.

    Every request must succeed: a failure is a request a client would have seen fail.
    """

    def __init__(
        self,
        urls: list[str],
        model: str,
        token: str,
        pause: float = 0.005,
        bodies: Sequence[dict[str, Any]] = (),
        verify: ssl.SSLContext | bool = True,
        keep_alive: bool = True,
    ) -> None:
        """`bodies`: V2 requests sent in turn (default: V2_ROW alone). `verify`: how https
        URLs' certificates are checked. Without `keep_alive` every request opens (and for
        https, shakes hands on) a connection of its own."""
        self.urls, self.model, self.token, self.pause = urls, model, token, pause
        self.verify = verify
        self.limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        self.bodies = list(bodies) or [V2_ROW]
        self.versions: dict[str, Counter[str]] = {url: Counter() for url in urls}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(url,)) for url in urls]

    def __enter__(self) -> LoadLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=10, verify=self.verify,
                          limits=self.limits) as client:  # fmt: skip
            for body in itertools.cycle(self.bodies):
                if self._stop.is_set():
                    break
                try:
                    response = client.post(f"/v2/models/{self.model}/infer", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{url}: {exc!r}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{url}: {response.status_code} {response.text[:200]}")
                else:
                    self.versions[url][response.json()["model_version"]] += 1
                # ~200 requests/s per host by default: enough to catch a dropped switch,
                # without starving the Ansible run under test of the machine's two cores.
                self._stop.wait(self.pause)


def stop_services(*roots: Path) -> None:
    """Stop what the tests deployed under `roots`: containers by their root label, supervisord
    per service root. Nothing else on the engine is touched."""
    listed = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=io.modelyard.root",
         "--format", '{{.ID}} {{.Label "io.modelyard.root"}}'],
        capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    ids = [line.split()[0] for line in listed
           if any(line.split(maxsplit=1)[1].startswith(str(root)) for root in roots)]  # fmt: skip
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    for root in roots:
        for conf in root.rglob("supervisord.conf"):
            subprocess.run(["supervisorctl", "-c", str(conf), "shutdown"], capture_output=True)


def version_at(url: str, key: str | None = None, verify: ssl.SSLContext | bool = True) -> str:
    """The version that answers at `url` (as a client sending X-Modelyard-Key `key`)."""
    headers = {"X-Modelyard-Key": key} if key else {}
    response = httpx.get(f"{url}/version", headers=headers, timeout=5, verify=verify)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:300]}"
    return response.json()["model_version"]


def remove_image(tags: dict[str, str]) -> None:
    """Take a version's image off the engine (every tag of it), so that a deploy must pull it."""
    refs = [tags["image_local_ref"], f"{tags['image_repository']}:{tags['image_tag']}",
            tags["image_ref"]]  # fmt: skip
    subprocess.run(["docker", "rmi", "--force", *refs], capture_output=True)
    gone = subprocess.run(["docker", "image", "inspect", tags["image_ref"]], capture_output=True)
    assert gone.returncode != 0, "the image is still on the engine; the deploy would not pull"
