"""Tests of the sandbox (broker/sandbox)."""
