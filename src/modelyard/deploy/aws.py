"""EC2 hosts of an `aws` environment: an inventory for the amazon.aws.aws_ec2 plugin that
selects running instances by their tags, and the plan of which hosts a deploy would touch.

Every instance tagged `modelyard:model=<model>` and `modelyard:environment=<env>` (plus the
spec's `aws.tags`) serves that environment; Ansible reaches it at `aws.address` (the private
address by default: run deploys from inside the VPC, or set public_dns_name). Credentials and
region come from the standard AWS chain; the inventory holds neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelyard.config import Settings
from modelyard.deploy.collections import ensure_amazon_aws
from modelyard.deploy.playbooks import Progress, inventory_hosts
from modelyard.errors import SpecError
from modelyard.spec import AwsHosts, Spec

MODEL_TAG = "modelyard:model"
ENVIRONMENT_TAG = "modelyard:environment"


@dataclass(frozen=True)
class PlannedHost:
    name: str  # the instance id
    address: str  # where Ansible connects
    instance_type: str
    zone: str
    tags: dict[str, str]


def inventory(settings: Settings, spec: Spec, environment: str) -> Path:
    """The environment's inventory folder (the aws_ec2 source and the group's variables)."""
    hosts = _aws_hosts(spec, environment)
    region = hosts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise SpecError(
            f"deploy.environments.{environment}.aws.region: no region; set it there or in "
            "AWS_REGION / AWS_DEFAULT_REGION"
        )
    filters = {f"tag:{k}": v for k, v in hosts.tags.items()} | {
        f"tag:{MODEL_TAG}": spec.name,
        f"tag:{ENVIRONMENT_TAG}": environment,
        "instance-state-name": "running",
    }
    source = {
        "plugin": "amazon.aws.aws_ec2",
        "regions": [region],
        "filters": filters,
        # Instance ids: unique and stable, unlike Name tags or addresses.
        "hostnames": ["instance-id"],
        "groups": {"model_hosts": "true"},
        "compose": {"ansible_host": hosts.address} | hosts.compose,
        "strict": True,
    }
    folder = settings.workspace / "inventories" / f"{spec.name}-{environment}"
    (folder / "group_vars").mkdir(parents=True, exist_ok=True)
    (folder / f"{spec.name}-{environment}.aws_ec2.yml").write_text(
        yaml.safe_dump(source, sort_keys=False)
    )
    (folder / "group_vars" / "model_hosts.yml").write_text(
        yaml.safe_dump(hosts.vars, sort_keys=False) if hosts.vars else "{}\n"
    )
    return folder


def plan(settings: Settings, spec: Spec, environment: str, progress: Progress) -> list[PlannedHost]:
    """The hosts a deploy of `environment` would touch, as the inventory finds them now."""
    folder = inventory(settings, spec, environment)
    hosts = inventory_hosts(folder, ensure_amazon_aws(settings, progress))
    return [_planned(name, facts) for name, facts in hosts.items()]


def _planned(name: str, facts: dict[str, Any]) -> PlannedHost:
    placement = facts.get("placement") or {}
    return PlannedHost(
        name=name,
        address=str(facts.get("ansible_host", ""))
        + (f":{facts['ansible_port']}" if facts.get("ansible_port") else ""),
        instance_type=str(facts.get("instance_type", "")),
        zone=str(placement.get("availability_zone", "")),
        tags={str(k): str(v) for k, v in (facts.get("tags") or {}).items()},
    )


def _aws_hosts(spec: Spec, environment: str) -> AwsHosts:
    env = spec.deploy.environments.get(environment)
    if env is None or env.target != "aws":
        raise SpecError(
            f"deploy.environments.{environment}: not an aws environment of {spec.name}; name "
            "one whose target is aws"
        )
    return env.aws or AwsHosts()


def describe(hosts: list[PlannedHost]) -> str:
    return json.dumps([h.__dict__ for h in hosts], indent=2)
