"""Governance: PII scrubbing, constitutional validation, Rego policies, hash-chained audit, promotion gate.

Imports nothing from serve/train/evals; the Serve app and the flywheel job call into it.
"""

from ray_app.native import use_compiled

use_compiled(__path__)  # the compiled PII scrub when it is current (ray_app/native.py), before anything imports it
