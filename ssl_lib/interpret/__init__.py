"""Interpretation maps of vision models (attention rollout of vision transformers)."""
