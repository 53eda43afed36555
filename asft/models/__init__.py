"""Generative recommender models."""
