"""autoresearch dashboard and agent engine.

The engine modules (parser, results, git_repo, credentials, llm + providers, prompt, training_run, decision,
orchestrator, headless, lock, status_file, config, events) never import Textual: the dashboard puts a screen on top
of them, headless runs them without one.
"""
