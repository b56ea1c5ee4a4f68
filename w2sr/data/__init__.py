"""Where problems come from and how they become prompts: sources, benchmarks, the k-hop world,
templates and rendering."""
