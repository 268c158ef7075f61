"""Turning raw images, videos and conversations into model inputs (torch-free)."""
