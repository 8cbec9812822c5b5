"""Metabase dashboards: card definitions and the provisioning client."""
