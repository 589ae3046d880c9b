"""Test helpers for the agent engine: fake LLM servers, a stand-in trainer, a keyring backend, a temp-repo builder."""
