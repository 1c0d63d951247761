"""Everything that optimises, in one place, outside the heads: the one training loop (loop.py), the one checkpoint
format (checkpoint.py), and the three trainers that use them: keypoint embeddings (keypoints.py), the hyperfeature
aggregator (hyperfeatures.py) and diffprobe-mini (mini.py). The trainers drive the model through the runner.
"""

from diffprobe.training.loop import SCHEDULE, load_optimizer_tensors, optimizer_tensors, run_steps

__all__ = ["SCHEDULE", "load_optimizer_tensors", "optimizer_tensors", "run_steps"]
