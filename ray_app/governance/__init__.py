"""Governance: PII scrubbing, constitutional validation, Rego policies, hash-chained audit, promotion gate.

Imports nothing from serve/train/evals; the Serve app and the flywheel job call into it.
"""
