"""Watching deployed versions: drift bins (`bins`), PSI from Prometheus (`drift`)."""
