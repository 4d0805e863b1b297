"""Collect: run a frozen base model over conversations and store the hidden states a draft needs."""
