"""Text from a model: the sampling controls and the batched sampler."""
