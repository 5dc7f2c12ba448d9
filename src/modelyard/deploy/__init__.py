"""Put registered versions in front of traffic: Ansible rollouts, the release ledger, rollback."""
