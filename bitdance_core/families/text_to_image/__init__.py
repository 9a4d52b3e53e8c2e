"""Text-to-image BitDance (Qwen3 prior, prompts): config, loader, random checkpoints, pipeline."""
