"""The model families: one package each (text-to-image, class-conditional)."""
