"""Tests of one module or stage on tiny data: no whole pipeline, no CLI end to end."""
