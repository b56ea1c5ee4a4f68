"""The learner: DeepSpeed on a Ray Train worker group, for SFT and GRPO alike (its run, engine,
step loop, checkpoints, export and trackers), with the batches and the RL loss maths."""
