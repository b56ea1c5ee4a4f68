"""vLLM plumbing: engine settings, the Ray Data generator, the rollout engines and their weight
sync, the Serve app."""
