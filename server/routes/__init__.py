"""HTTP routes: generate, openai (images API), health (healthz/readyz/metrics/info), web (page)."""
