"""Test support shared by the tests, the simulator and the tools."""
