"""Governance: PII scrubbing, constitutional validation, Rego policies, hash-chained audit, promotion gate.

Imports nothing from serve/train/evals; the Serve app and the flywheel job call into it, and
both build it the same way: `from_settings(settings)`.
"""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from ray_app.native import use_compiled

if TYPE_CHECKING:
    from ray_app.config import Settings
    from ray_app.governance.audit import AuditLog
    from ray_app.governance.policy import PolicyEngine
    from ray_app.governance.validator import Validator
    from ray_app.storage.base import AuditStore

use_compiled(__path__)  # the compiled PII scrub when it is current (ray_app/native.py), before anything imports it


class Governance:
    """The constitution's machinery for one process, built from the settings in one place (the Serve
    app and the flywheel job alike): the Rego engine, the Validator on it, and the hash-chained audit
    trail, all of one constitutional hash. Each part is built on first use: a Ray task that only
    validates opens no audit store. Built where it is used, never shipped: regorus engines are pinned
    to the thread that made them and do not pickle (a Ray task builds its own; loading the packaged
    Rego takes a few ms)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def policies(self) -> PolicyEngine:
        from ray_app.governance.policy import PolicyEngine

        return PolicyEngine.load(constitutional_hash=self.settings.governance.constitutional_hash)

    @cached_property
    def validator(self) -> Validator:
        from ray_app.governance.validator import Validator

        gov = self.settings.governance
        return Validator(self.policies, constitutional_hash=gov.constitutional_hash, min_compliance=gov.min_compliance)

    @cached_property
    def audit_store(self) -> AuditStore:
        from ray_app.storage import open_audit_store

        return open_audit_store(self.settings)

    @cached_property
    def audit(self) -> AuditLog:
        from ray_app.governance.audit import AuditLog

        gov = self.settings.governance
        return AuditLog(self.audit_store, constitutional_hash=gov.constitutional_hash,
                        sample_rate=gov.audit_sample_rate)


def from_settings(settings: Settings) -> Governance:
    return Governance(settings)
