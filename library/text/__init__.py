"""Prompt text below training and inference: attention-weight parsing and weighted text encoding."""
