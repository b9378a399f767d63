pytest_plugins = ["dpo.testing"]
