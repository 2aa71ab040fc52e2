"""What tests share besides fixtures: the SLURM harness, launch helpers, weight and tensor comparisons."""
