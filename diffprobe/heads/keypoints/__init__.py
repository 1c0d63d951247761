"""StableKeypoints: unsupervised keypoints by optimising embeddings fed to cross-attention.

Modules: affine (random transforms, exact inverses), targets (Gaussians, argmax, soft-argmax),
selection (KL candidates, farthest point sampling, frequency vote), losses (localisation,
equivariance), maps (attention maps through diffprobe.hooks), image_sets (images, crops and the
pixel frames between original and processed images), state (save/load, checkpoints), fit, predict.
"""
