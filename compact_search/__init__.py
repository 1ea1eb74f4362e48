"""compact-search: per-head structured sparse attention for video diffusion transformers."""

from compact_search.runtime.attention import sparse_attention

# The one version string: pyproject.toml reads it from here (setuptools dynamic version).
__version__ = "0.1.0"


def apply(pipeline_or_transformer, config, **options):
    """Run a pipeline's self-attention with a config's patterns; see runtime.apply.apply."""
    from compact_search.runtime.apply import apply as _apply

    if not hasattr(config, "heads"):  # a path
        from compact_search.config import load_config

        config = load_config(config)
    return _apply(pipeline_or_transformer, config, **options)


__all__ = ["__version__", "apply", "sparse_attention"]
