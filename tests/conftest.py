"""Shared test setup: dpo's own pytest plugin (fixtures and the ``backend`` marker), enabled the
way a plugin author would enable it."""

pytest_plugins = ["dpo.testing"]
