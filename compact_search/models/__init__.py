"""Model adapters: where compact-search meets a diffusion transformer's self-attention."""
