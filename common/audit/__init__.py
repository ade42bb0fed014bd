"""The privacy audit: what a released model actually leaks (canary exposure, membership
inference, extraction, per-block risk). Measurements, not guarantees: see common/privacy/."""
