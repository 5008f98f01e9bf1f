"""Distributed runtime and tensor-parallel plans for the k4flash DiT (the model never mentions ranks)."""
