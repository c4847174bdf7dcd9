"""The built-in stages, one module each, every one ending with `STAGE = Stage(...)`; pipeline.stage_registry
finds them by walking this package (and third-party stages through the entry-point group rst_mart.stages)."""
