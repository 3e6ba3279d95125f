"""The attention engine: pure math, detection, calibration and patching. Knows nothing about files."""
