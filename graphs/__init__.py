"""Serve applications assembled from configuration."""
