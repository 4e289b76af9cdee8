"""Tests that run several stages, the CLI end to end, clusters and applications (demo, study, export, features)."""
